"""Shadow comparison: inspect a candidate version on image sets another version already inspected, then compare.

The candidate's results are rows of its own version (inspections are per image and version), so
nothing the current version recorded changes: lot dispositions stay per version, and the report
picks the production version where a scope holds several. The comparison is recorded
(db/comparisons.py), which is what a promotion over the production version asks for.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from defectscan.config import Settings
from defectscan.db.comparisons import Comparison, compare_results, record_comparison
from defectscan.db.schema import Image, ImageSet, Inspection, Model
from defectscan.errors import DataError


def shadow_compare(
    new_session: Callable[[], Session],
    settings: Settings,
    candidate_ref: str,
    current_ref: str,
    *,
    lot: str | None = None,
    image_set_ids: list[str] = (),
    by: str | None = None,
    n_workers: int | None = None,
    echo: Callable[[str], None] = print,
) -> Comparison:
    """Inspect with the candidate where the current version has results (a lot, or image sets), compare, record."""
    from defectscan.data.register import get_image_set
    from defectscan.model.registry import model_to_run
    from defectscan.pipeline.by_name import run_inspect

    if (lot is None) == (not image_set_ids):
        raise DataError("give --lot or --imageset (not both): where to compare")
    with new_session() as session:
        candidate, current = model_to_run(session, candidate_ref), model_to_run(session, current_ref)
        if candidate.id == current.id:
            raise DataError(f"{candidate.name}:{candidate.version} against itself: give two versions")
        if lot is not None:
            sets = list(session.scalars(select(ImageSet).where(ImageSet.lot == lot).order_by(ImageSet.id)))
            if not sets:
                raise DataError(f"no image set has lot {lot!r}")
        else:
            sets = [get_image_set(session, ident) for ident in image_set_ids]
        judged = session.scalar(
            select(func.count(Inspection.id)).join(Image, Inspection.image_id == Image.id)
            .where(Inspection.model_id == current.id, Image.image_set_id.in_([s.id for s in sets]))
        )
        if not judged:
            raise DataError(f"{current.name}:{current.version} has no results there to compare with: inspect with it first")
        versions, set_ids = (candidate.id, current.id), [s.id for s in sets]
        candidate_label = f"{candidate.name}:{candidate.version}"
    summary = run_inspect(new_session, settings, candidate_label, [str(i) for i in set_ids], job="compare", n_workers=n_workers, echo=echo)
    if summary.status not in ("succeeded", "partial"):
        raise DataError(f"the candidate's inspection ended {summary.status}: {'; '.join(summary.errors[:3])}")
    if summary.counts.pending:
        # A comparison over the images that happened to be judged is not one a promotion may rest on.
        raise DataError(f"the candidate's inspection left {summary.counts.pending} images pending ({'; '.join(summary.errors[:3])}): "
                        "nothing recorded; compare again once they can be inspected")
    with new_session() as session:
        candidate, current = (session.get(Model, i) for i in versions)
        comparison = compare_results(session, candidate, current, set_ids)
        if not comparison.images:
            # A comparison over nothing would still be the one a promotion asks for.
            raise DataError(f"{candidate_label} and {current.name}:{current.version} have no judged image in common there "
                            f"(images in error on either side are left out): nothing recorded")
        record_comparison(session, candidate, current, comparison, by=by)
    return comparison
