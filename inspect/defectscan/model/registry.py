"""The model registry: the `models` table, one row per (name, version).

A row records where the `.keras` file is (absolute path), its sha256, the architecture, the
input spec, the class names in output-channel order, the decision threshold, how it was trained
and how it scored. Loading a registered model checks the file against the recorded sha256
first, so a replaced or damaged file is refused instead of silently used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from defectscan.db import model_refs
from defectscan.db.schema import MODEL_STAGES, Model, ModelStageChange
from defectscan.errors import DataError, ModelError
from defectscan.model.export import file_sha256, load_model
from defectscan.model.precision import (
    ParityCheck,
    check_images,
    check_parity,
    check_precision_name,
    check_recorded_check,
    recorded_check,
    require_passed,
)
from defectscan.model.verdict import DEFAULT_RULES, VerdictRules, per_class_without
from defectscan.paths import DEMO_DIR, DEMO_METADATA, DEMO_MODEL
from defectscan.users import user_name
from defectscan.yamlfile import read_mapping


@dataclass(frozen=True)
class ModelMetadata:
    """What is registered with a model file; read from a JSON/YAML sidecar or given directly."""

    name: str | None = None
    version: str | None = None
    classes: list[str] | None = None
    threshold: float | None = None
    input_spec: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    description: str | None = None
    # The verdict rule chosen on held-out images (model/operating_point.py) with the figures it was chosen on.
    operating_point: dict[str, Any] | None = None
    # The precision workers run the model in, and the parity check against float32 that admitted it (model/precision.py).
    precision: str | None = None
    precision_check: dict[str, Any] | None = None

    def rules(self) -> VerdictRules:
        """The verdict rule these metadata give the model (the default rule when none was chosen)."""
        return rules_for(self.operating_point, self.threshold)


def rules_for(point: dict[str, Any] | None, threshold: float | None) -> VerdictRules:
    """The rule of a recorded operating point, else the default rule (at `threshold` when one is known)."""
    if point:
        return VerdictRules.from_dict(point)
    return replace(DEFAULT_RULES, threshold=threshold) if threshold is not None else DEFAULT_RULES


def default_point(threshold: float | None, reason: str) -> dict[str, Any]:
    """An operating point for a model without a chosen one: the default rule, and why it is used."""
    return {**rules_for(None, threshold).as_dict(), "chosen_by": f"default rule: {reason}"}


def sidecar_path(model_path: str | Path) -> Path:
    """The metadata file that travels with a model file: model.keras -> model.json."""
    return Path(model_path).with_suffix(".json")


def sidecar_metadata(model_path: str | Path) -> ModelMetadata:
    """The sidecar's metadata, or empty metadata when the model file has none."""
    path = sidecar_path(model_path)
    return read_metadata(path) if path.is_file() else ModelMetadata()


def record_operating_point(sidecar: str | Path, point: dict[str, Any]) -> Path:
    """Write `point` (and its threshold) into the sidecar JSON, keeping what else it holds."""
    data = _sidecar_data(sidecar)
    if data.get("precision_check") and VerdictRules.from_dict(point) != rules_for(data.get("operating_point"), data.get("threshold")):
        # The parity check compared verdicts under the old rule: it says nothing of the new one.
        data["precision_check"] = None
    return _write_sidecar(sidecar, {**data, "operating_point": point, "threshold": point["threshold"]})


def record_precision(sidecar: str | Path, precision: str, check: ParityCheck | None) -> Path:
    """Write the precision and its passed parity check into the sidecar JSON, keeping what else it holds."""
    return _write_sidecar(sidecar, {**_sidecar_data(sidecar), "precision": precision, "precision_check": check.as_dict() if check else None})


def _sidecar_data(sidecar: str | Path) -> dict[str, Any]:
    sidecar = Path(sidecar)
    return read_mapping(sidecar, what="model metadata file", contents="model metadata", error=ModelError) if sidecar.is_file() else {}


def _write_sidecar(sidecar: str | Path, data: dict[str, Any]) -> Path:
    sidecar = Path(sidecar)
    sidecar.write_text(json.dumps(data, indent=2) + "\n")
    return sidecar


def read_metadata(path: str | Path) -> ModelMetadata:
    path = Path(path)
    data = read_mapping(path, what="model metadata file", contents="model metadata", error=ModelError)  # JSON is YAML
    known = set(ModelMetadata.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ModelError(f"{path}: unknown metadata key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")
    if data.get("operating_point"):
        check_point(data["operating_point"], path, data.get("classes"))
    if data.get("precision_check") is not None:
        check_recorded_check(data["precision_check"], path)
    return ModelMetadata(**data)


def check_point(point: Any, source: str | Path, classes: list[str] | None) -> dict[str, Any]:
    """An operating point as the rule reads it, its per-class rules for classes the model has (a misspelt class's
    rule would be stored and never applied); ModelError names the source and what is wrong."""
    if not isinstance(point, dict):
        raise ModelError(f"{source}: operating_point must be a mapping (threshold, min_defect_area, fail_score), got {type(point).__name__}")
    per_class = point.get("per_class")
    if per_class is not None and not (isinstance(per_class, dict) and all(isinstance(r, dict) for r in per_class.values())):
        raise ModelError(f"{source}: operating_point: per_class must map class names to rules (threshold, min_defect_area, fail_score), "
                         f"got {per_class!r}")
    if point.get("figures") is not None:
        # What `models show` prints of it: read back from the registry, a wrong one broke the command for good.
        _check_figures(point["figures"], f"{source}: operating_point: figures", counts=("images", "defective_images"))
        if not _is_number(point.get("target_false_call_rate")):
            raise ModelError(f"{source}: operating_point: figures need target_false_call_rate (a number) beside them, "
                             f"got {point.get('target_false_call_rate')!r}")
    try:
        rules = VerdictRules.from_dict(point)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{source}: operating_point: {exc}") from None
    unknown = sorted(set(rules.per_class or {}) - set(classes or ())) if classes else []
    if unknown:
        raise ModelError(f"{source}: operating_point: per_class names class(es) {', '.join(unknown)} the model does not have; "
                         f"its classes: {', '.join(classes)}")
    return point


def read_metrics(path: str | Path) -> dict[str, Any]:
    """An evaluation's figures (`evaluate --json`) to register with a version, checked as `check_metrics` does."""
    return check_metrics(read_mapping(Path(path), what="metrics file", contents="evaluation figures", error=ModelError), path)


def check_metrics(metrics: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """Metrics as `evaluate --json` writes them: a mapping whose `verdict_rule` is a mapping of figures and whose
    `thresholds` maps each threshold to one (what `models list` and the QA report read back)."""
    if not isinstance(metrics, dict):
        raise ModelError(f"{source}: metrics must be a mapping of evaluation figures (evaluate --json), got {type(metrics).__name__}")
    rule, table = metrics.get("verdict_rule"), metrics.get("thresholds")
    if rule is not None and not isinstance(rule, dict):
        raise ModelError(f"{source}: metrics 'verdict_rule' must be a mapping of figures, got {type(rule).__name__}")
    if rule is not None:
        _check_figures(rule, f"{source}: metrics 'verdict_rule'")
    if table is not None and not (isinstance(table, dict) and all(isinstance(row, dict) for row in table.values())):
        raise ModelError(f"{source}: metrics 'thresholds' must map each threshold to a mapping of figures")
    for threshold, row in (table or {}).items():
        _check_figures(row, f"{source}: metrics 'thresholds' {threshold}")
    return metrics


# The figures `models list`, `models show` and the QA report read back as numbers (None where not measured).
RATE_FIGURES = ("tpr", "tnr", "escape_rate", "false_call_rate", "dice", "dice_defective", "image_auroc")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_figures(figures: Any, where: str, counts: tuple[str, ...] = ()) -> None:
    if not isinstance(figures, dict):
        raise ModelError(f"{where} must be a mapping of figures, got {type(figures).__name__}")
    for key in RATE_FIGURES:
        if figures.get(key) is not None and not _is_number(figures[key]):
            raise ModelError(f"{where}: {key} must be a number (or null), got {figures[key]!r}")
    for key in counts:
        if not (isinstance(figures.get(key), int) and not isinstance(figures.get(key), bool)):
            raise ModelError(f"{where}: {key} must be a count of images, got {figures.get(key)!r}")


def architecture_of(model) -> str:
    """What the models row says the file is: "UNet(16,32,64,...)", with " x 4 views" for a view average."""
    from defectscan.model.views import views_of

    unet = getattr(model, "unet", model)
    text = f"{type(unet).__name__}({','.join(str(f) for f in unet.get_config().get('filters', []))})"
    return text if views_of(model) == 1 else f"{text} x {views_of(model)} views"


def register_model(
    session: Session,
    path: str | Path,
    *,
    name: str | None = None,
    version: str | None = None,
    metadata: ModelMetadata | None = None,
    classes: list[str] | None = None,
    threshold: float | None = None,
    metrics: dict[str, Any] | None = None,
    stage: str = "staging",
    description: str | None = None,
    operating_point: dict[str, Any] | None = None,
    precision: str | None = None,
    check_data: str | Path | None = None,
) -> Model:
    """Check the file loads and agrees with its class list, then add its row. Arguments beat metadata.
    A precision other than float32 needs a passed parity check (`_admit_precision`)."""
    from defectscan.model.preprocess import contract_of

    path = Path(path).resolve()
    meta = metadata or ModelMetadata()
    name = name or meta.name
    version = version or meta.version
    if not name or not version:
        raise ModelError(f"{path}: registering needs a name and a version (--name, --version or the metadata file)")
    _check_free(session, name, version, stage)
    sha256 = file_sha256(path)
    model = load_model(path)
    outputs = int(model.output_shape[-1])
    classes = classes or meta.classes or (["defect"] if outputs == 1 else [f"class{i + 1}" for i in range(outputs)])
    if len(classes) != outputs:
        raise ModelError(f"{path}: the model has {outputs} output classes but {len(classes)} class names were given ({', '.join(classes)})")
    recorded = operating_point or meta.operating_point
    # The metadata's own threshold is the rule's only without a recorded point (as `evaluate` reads it); an
    # explicit one overrides the point.
    point = _operating_point(path, recorded, threshold, classes, meta.threshold)
    precision = check_precision_name(precision or meta.precision or "float32")
    check = _admit_precision(path, sha256, precision, meta, VerdictRules.from_dict(point), check_data)
    # The file's own structure decides its input multiple and receptive radius, whatever a sidecar says.
    input_spec = contract_of(model).to_dict()
    row = Model(
        name=name,
        version=version,
        uri=str(path),
        sha256=sha256,
        architecture=architecture_of(model),
        input_spec=input_spec,
        classes=list(classes),
        threshold=float(point["threshold"]),
        operating_point=point,
        precision=precision,
        precision_check=check.as_dict() if check else None,
        training=meta.training,
        metrics=check_metrics(metrics, "--metrics") if metrics is not None else meta.metrics and check_metrics(meta.metrics, "model metadata"),
        stage=stage,
        description=description or meta.description,
    )
    session.add(row)
    session.add(ModelStageChange(model=row, to_stage=stage, reason="registered", changed_by=user_name()))
    try:
        session.commit()
    except IntegrityError:
        # Another process registered the same name and version between our look-up and this insert.
        session.rollback()
        winner = session.scalar(select(Model).where(Model.name == name, Model.version == version))
        if winner is None:
            raise
        raise AlreadyRegistered(f"model {name}:{version} is already registered (file {winner.uri}); choose another version") from None
    return row


def _check_free(session: Session, name: str, version: str, stage: str) -> None:
    """Refuse a name or version no reference could name, one taken, or a second production version."""
    model_refs.check_model_name(name)
    model_refs.check_version_name(version)
    if name == model_refs.DEMO_ALIAS:
        raise ModelError(f"model name {name!r} stands for the shipped demo model ({model_refs.demo_name()}) in every command; choose another name")
    if stage not in MODEL_STAGES:
        raise ModelError(f"stage {stage!r} is not one of {', '.join(MODEL_STAGES)}")
    existing = session.scalar(select(Model).where(Model.name == name, Model.version == version))
    if existing is not None:
        raise AlreadyRegistered(f"model {name}:{version} is already registered (file {existing.uri}); choose another version")
    if stage == "production":
        from defectscan.model.stages import last_in_production

        current = session.scalar(select(Model).where(Model.name == name, Model.stage == "production"))
        if current is not None:
            raise ModelError(f"model {current.name}:{current.version} is in production; register {name}:{version} in staging "
                             f"and promote it (defectscan models promote {name}:{version}), which archives the other")
        last = last_in_production(session, name)
        if last is not None:
            # Straight into production would skip the comparison a promotion asks for against the last one there.
            raise ModelError(f"model {last.name}:{last.version} was the last version of {name} in production; register "
                             f"{name}:{version} in staging, compare it and promote it (defectscan models promote {name}:{version})")


def _admit_precision(path: Path, sha256: str, precision: str, meta: ModelMetadata, rules: VerdictRules,
                     check_data: str | Path | None) -> ParityCheck | None:
    """The passed parity check of `precision` (None for float32): the metadata's for this very file, unless data is given, else a new one."""
    if precision == "float32":
        return None
    recorded = recorded_check(meta.precision_check, precision, sha256) if check_data is None else None
    # The metadata's check compared verdicts under the metadata's own rule: it stands for that rule only.
    check = recorded if rules == meta.rules() else None
    if check is None:
        try:
            images = check_images(check_data, meta.training, len(meta.classes or [None]))
        except DataError as exc:
            if recorded is not None:
                raise DataError(f"{path}: its {precision} check was made under its recorded rule ({meta.rules().describe()}), not this one "
                                f"({rules.describe()}): give --check-data DIR to check {precision} under this rule, or --precision float32") from None
            raise exc
        check = require_passed(check_parity(path, precision, images, rules, expected_sha256=sha256, class_names=meta.classes))
    return check


class AlreadyRegistered(ModelError):
    """The name and version are taken (possibly by a process that registered them a moment ago)."""


def _operating_point(path: Path, recorded: dict[str, Any] | None, threshold: float | None, classes: list[str],
                     default_threshold: float | None) -> dict[str, Any]:
    """The rule to store: the recorded operating point (an explicit threshold over its own, for every class),
    else the default rule (at the metadata's threshold)."""
    point = dict(recorded) if recorded else default_point(default_threshold, "no operating point recorded with the model")
    if threshold is not None and threshold != point.get("threshold"):
        # The chosen point's figures were measured at its own threshold: they do not describe this one.
        point = {key: point[key] for key in VerdictRules.__dataclass_fields__ if key in point}
        per_class = per_class_without(point.pop("per_class", None), {"threshold"})
        if per_class:
            point["per_class"] = per_class
        point.update(threshold=threshold, chosen_by=f"threshold {threshold:g} given at registration"
                     + (f" over the recorded {recorded['threshold']:g}" if recorded and "threshold" in recorded else ""))
    return check_point(point, path, classes)


def set_precision(session: Session, reference: str, precision: str, check_data: str | Path | None = None) -> tuple[Model, ParityCheck | None]:
    """Record the precision a registered version runs in, after a passed parity check (none for float32); without
    `check_data`, a passed check its file's sidecar records for it (the shipped demo's) stands."""
    row = get_model(session, reference)
    check = None
    if check_precision_name(precision) != "float32":
        if check_data is None and sidecar_path(row.uri).is_file():
            meta = sidecar_metadata(row.uri)
            if meta.rules() == operating_rules(row):  # the sidecar's check was run under the sidecar's rule
                check = recorded_check(meta.precision_check, precision, row.sha256)
        if check is None:
            images = check_images(check_data, row.training, len(row.classes or [None]))
            check = require_passed(check_parity(row.uri, precision, images, operating_rules(row), expected_sha256=row.sha256,
                                                 class_names=list(row.classes or []) or None))
    row.precision, row.precision_check = precision, check.as_dict() if check else None
    session.commit()
    return row, check


def check_file_precision(path: str | Path, precision: str, check_data: str | Path | None = None) -> ParityCheck | None:
    """The passed parity check of a model file not registered yet (None for float32), under its sidecar's operating point."""
    if not Path(path).is_file():
        raise ModelError(f"{path}: no such model file")
    if check_precision_name(precision) == "float32":
        return None
    meta = sidecar_metadata(path)
    images = check_images(check_data, meta.training, len(meta.classes or [None]))
    return require_passed(check_parity(path, precision, images, meta.rules(), class_names=meta.classes))


def describe_precision(precision: str, check: dict[str, Any] | None) -> str:
    """One line: the precision, and the parity figures that admitted it."""
    if precision == "float32" or not check:
        return precision
    return f"{precision}, checked {check['checked_at']}: {ParityCheck.from_dict(check).describe()}"


def operating_rules(row: Model) -> VerdictRules:
    """The verdict rule a registered version is inspected with (unless settings or a job override it)."""
    return rules_for(row.operating_point, row.threshold)


def describe_operating_point(point: dict[str, Any] | None) -> str:
    """One line: the rule, and the held-out figures it was chosen on."""
    if not point:
        return "none recorded (the default rule)"
    text = VerdictRules.from_dict(point).describe()
    figures = point.get("figures")
    if not figures:
        return f"{text} ({point.get('chosen_by', 'given at registration')})"
    def f(key: str) -> str:
        return "-" if figures.get(key) is None else f"{figures[key]:.3f}"

    caution = f" (caution: {point['caution']})" if point.get("caution") else ""
    return (
        f"{text}; chosen on {figures['images']} held-out images ({figures['defective_images']} defective) for a false-call rate "
        f"<= {point['target_false_call_rate']:g}: escape rate {f('escape_rate')}, false-call rate {f('false_call_rate')}, "
        f"Dice {f('dice')} (defective images {f('dice_defective')}){caution}"
    )


def list_models(session: Session, name: str | None = None) -> list[Model]:
    query = select(Model).order_by(Model.name, Model.id)
    if name is not None:
        query = query.where(Model.name == model_refs.model_name(name))
    return list(session.scalars(query))


def get_model(session: Session, reference: str) -> Model:
    """The one version a model reference names (db/model_refs.py: NAME, NAME:VERSION, NAME:STAGE)."""
    return model_refs.resolve(session, reference)


def model_to_run(session: Session, reference: str) -> Model:
    """The version a run (inspect, a job) uses. `demo` stands for the shipped demo model's name, whose
    shipped version is registered on first use. A bare `demo` is its production version (the shipped
    one, or a fine-tuned one once promoted), as a job runs it: a version registered from a fine-tune
    waits for promotion like any other; `demo:latest` names the newest registered."""
    if model_refs.parse(reference).name == model_refs.DEMO_ALIAS:
        register_demo(session)
        session.commit()
    return get_model(session, reference)


def is_registered_reference(text: str | None) -> bool:
    """`model.init_from` names a registered version (NAME:VERSION, NAME:STAGE) rather than a file: it has a
    colon and no such file exists."""
    return text is not None and ":" in text and not Path(text).exists()


def registered_file(session: Session, reference: str) -> Model:
    """A registered version whose file is used directly (fine-tuning from it), after checking the file against its sha256."""
    row = model_to_run(session, reference)
    if not Path(row.uri).is_file():
        raise ModelError(f"model {row.name}:{row.version}: its file {row.uri} is missing")
    found = file_sha256(row.uri)
    if found != row.sha256:
        raise ModelError(f"model {row.name}:{row.version}: {row.uri} has sha256 {found}, the registry recorded {row.sha256}: the file changed")
    return row


def resolve_init_from(session: Session, recipe) -> Model | None:
    """Point a recipe's `model.init_from` at the file of the registered version it names (checked against its
    sha256); the version's row, or None when init_from is a file, "demo" or unset."""
    if not is_registered_reference(recipe.model.init_from):
        return None
    donor = registered_file(session, recipe.model.init_from)
    recipe.model.init_from = donor.uri
    return donor


def load_registered(session: Session, reference: str):
    """(row, Keras model) after checking the file against the recorded sha256; `demo` is registered on first use,
    as `inspect` does (`evaluate demo` on a new database found no model)."""
    row = model_to_run(session, reference)
    return row, load_model(row.uri, expected_sha256=row.sha256)


def describe(row: Model) -> dict[str, Any]:
    """The row as plain data (what `models show` prints as JSON)."""
    return {
        "name": row.name,
        "version": row.version,
        "stage": row.stage,
        "uri": row.uri,
        "sha256": row.sha256,
        "architecture": row.architecture,
        "input_spec": row.input_spec,
        "classes": row.classes,
        "threshold": row.threshold,
        "operating_point": row.operating_point,
        "precision": row.precision,
        "precision_check": row.precision_check,
        "training": row.training,
        "metrics": row.metrics,
        "description": row.description,
        "registered_at": row.registered_at.isoformat() if row.registered_at else None,
    }


def register_demo(session: Session) -> Model:
    """The demo model shipped inside the package: its row, registered on first use.

    Idempotent, so that `make demo` and jobs naming `model: demo` can call it on every run (it puts
    the shipped version in production, see below); a
    row whose checksum differs from the shipped file is refused rather than silently reused.
    """
    from defectscan.model.stages import last_in_production, promote

    meta = read_metadata(DEMO_METADATA)
    existing = session.scalar(select(Model).where(Model.name == meta.name, Model.version == meta.version))
    # `model: demo` jobs run the production version of its name: the shipped one, unless the plant promoted its own
    # (a fine-tuned version); a newly shipped version replaces an older shipped one, whose file the upgrade replaced.
    current = session.scalar(select(Model).where(Model.name == meta.name, Model.stage == "production"))
    if existing is None:
        try:
            first = current is None and last_in_production(session, meta.name) is None
            existing = register_model(session, DEMO_MODEL, metadata=meta, stage="production" if first else "staging")
        except AlreadyRegistered:
            # Two first runs at once (two cron jobs on a new database): the loser uses the winner's row.
            existing = session.scalar(select(Model).where(Model.name == meta.name, Model.version == meta.version))
    shipped = file_sha256(DEMO_MODEL)
    if existing.sha256 != shipped:
        raise ModelError(
            f"{DEMO_MODEL}: the registered demo model {meta.name}:{meta.version} has sha256 {existing.sha256} "
            f"but the shipped file has {shipped}; register this file under another version"
        )
    if existing.uri != str(DEMO_MODEL):
        # The same file (same checksum) installed elsewhere: a new virtual env, a rebuilt image.
        existing.uri = str(DEMO_MODEL)
    if existing.stage == "staging" and (current is None or _is_shipped(current)):
        replaced = f": replaces the shipped {current.version}" if current is not None else ""
        existing, _ = promote(session, f"{meta.name}:{meta.version}", reason=f"the shipped demo model{replaced}", without_comparison=True)
    return existing


def _is_shipped(row: Model) -> bool:
    """A version whose file is the package's demo model, wherever the package was installed then."""
    return Path(row.uri).parent.parts[-3:] == DEMO_DIR.parts[-3:]


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)
