"""Shadow comparison figures: a candidate model version against another on the images both inspected.

Each image judged by both (errors left out) counts once: agreement, verdict flips in each direction,
and, where QA decided the image (db/reviews.py), what the candidate changes for QA: false calls it
fixes (QA passed, current failed, candidate passes), new false calls (QA passed, current passed,
candidate fails), escapes it catches (QA failed, current passed, candidate fails), new escapes (QA
failed, current failed, candidate passes). Comparisons are recorded, so a promotion can ask whether
the candidate was ever compared against the version in production.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from defectscan.db.reviews import qa_truth
from defectscan.db.schema import Image, ImageSet, Inspection, Model, ModelComparison
from defectscan.times import iso_utc
from defectscan.users import user_name

FLIP_COLUMNS = ("image_id", "image_key", "lot", "current", "candidate", "qa", "effect", "current_inspection", "candidate_inspection")
# What a flip means for QA, by (QA's decision, current verdict, candidate verdict): the figure it counts in.
FLIP_EFFECTS = {("pass", "fail", "pass"): "false_calls_fixed", ("pass", "pass", "fail"): "new_false_calls",
                ("fail", "pass", "fail"): "escapes_caught", ("fail", "fail", "pass"): "new_escapes"}


@dataclass
class Comparison:
    candidate: str
    current: str
    image_set_ids: list[int]
    lots: list[str]
    images: int = 0
    agree: int = 0
    pass_to_fail: int = 0
    fail_to_pass: int = 0
    reviewed: int = 0
    false_calls_fixed: int = 0
    new_false_calls: int = 0
    escapes_caught: int = 0
    new_escapes: int = 0
    flips: list[dict] = field(default_factory=list)
    # The recorded comparison's row, once recorded.
    id: int | None = None

    @property
    def agreement(self) -> float | None:
        return self.agree / self.images if self.images else None

    def figures(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("flips", "image_set_ids", "lots", "candidate", "current", "id")}
        return {**data, "agreement": None if self.agreement is None else round(self.agreement, 4)}

    def as_dict(self) -> dict:
        return {"comparison_id": self.id, "candidate": self.candidate, "current": self.current, "image_set_ids": self.image_set_ids, "lots": self.lots,
                **self.figures(), "flips": self.flips}


def compare_results(session: Session, candidate: Model, current: Model, image_set_ids: list[int]) -> Comparison:
    """The figures of `candidate` against `current` on the images of these image sets both judged."""
    mine, theirs = aliased(Inspection), aliased(Inspection)
    rows = session.execute(
        select(Image.id, Image.key, ImageSet.lot, theirs.verdict, mine.verdict, theirs.id, mine.id)
        .join(ImageSet, Image.image_set_id == ImageSet.id)
        .join(mine, (mine.image_id == Image.id) & (mine.model_id == candidate.id))
        .join(theirs, (theirs.image_id == Image.id) & (theirs.model_id == current.id))
        .where(Image.image_set_id.in_(image_set_ids), mine.verdict != "error", theirs.verdict != "error")
        .order_by(Image.id)
    ).all()
    lots = sorted({lot for lot in session.scalars(select(ImageSet.lot).where(ImageSet.id.in_(image_set_ids))) if lot})
    result = Comparison(f"{candidate.name}:{candidate.version}", f"{current.name}:{current.version}", sorted(image_set_ids), lots)
    qa = qa_truth(session, image_set_ids)
    for image_id, key, lot, before, after, inspection_id, candidate_inspection in rows:
        decision = qa.get(image_id)
        result.images += 1
        result.agree += before == after
        result.pass_to_fail += (before, after) == ("pass", "fail")
        result.fail_to_pass += (before, after) == ("fail", "pass")
        result.reviewed += decision is not None
        effect = FLIP_EFFECTS.get((decision, before, after))
        if effect is not None:
            setattr(result, effect, getattr(result, effect) + 1)
        if before != after:
            values = (image_id, key, lot, before, after, decision, effect, inspection_id, candidate_inspection)
            result.flips.append(dict(zip(FLIP_COLUMNS, values, strict=True)))
    return result


def record_comparison(session: Session, candidate: Model, current: Model, comparison: Comparison, *, by: str | None = None) -> int:
    row = ModelComparison(candidate_id=candidate.id, current_id=current.id,
                          scope={"image_set_ids": comparison.image_set_ids, "lots": comparison.lots},
                          figures=comparison.figures(), compared_by=user_name(by))
    session.add(row)
    session.commit()
    comparison.id = row.id
    return row.id


def last_comparison(session: Session, candidate: Model, current: Model) -> dict | None:
    """The newest recorded comparison of `candidate` against `current` (scope, figures, who, when), or None."""
    row = session.scalars(
        select(ModelComparison).where(ModelComparison.candidate_id == candidate.id, ModelComparison.current_id == current.id)
        .order_by(ModelComparison.id.desc()).limit(1)
    ).first()
    if row is None:
        return None
    return {"scope": row.scope, "figures": row.figures, "compared_by": row.compared_by, "compared_at": iso_utc(row.compared_at)}
