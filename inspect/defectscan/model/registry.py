"""The model registry: the `models` table, one row per (name, version).

A row records where the `.keras` file is (absolute path), its sha256, the architecture, the
input spec, the class names in output-channel order, the decision threshold, how it was trained
and how it scored. Loading a registered model checks the file against the recorded sha256
first, so a replaced or damaged file is refused instead of silently used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from defectscan.db.schema import MODEL_STAGES, Model
from defectscan.errors import ModelError
from defectscan.model.export import file_sha256, load_model
from defectscan.yamlfile import read_mapping

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_MODEL = DEMO_DIR / "tinyunet-synth-demo.keras"
DEMO_METADATA = DEMO_DIR / "tinyunet-synth-demo.json"


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


def read_metadata(path: str | Path) -> ModelMetadata:
    path = Path(path)
    data = read_mapping(path, what="model metadata file", contents="model metadata", error=ModelError)  # JSON is YAML
    known = set(ModelMetadata.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ModelError(f"{path}: unknown metadata key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")
    return ModelMetadata(**data)


def parse_reference(reference: str) -> tuple[str, str | None]:
    """NAME or NAME:VERSION."""
    name, _, version = reference.partition(":")
    if not name:
        raise ModelError(f"model reference {reference!r}: expected NAME or NAME:VERSION")
    return name, version or None


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
) -> Model:
    """Check the file loads and agrees with its class list, then add its row. Arguments beat metadata."""
    from defectscan.model.preprocess import INPUT_SPEC

    path = Path(path).resolve()
    meta = metadata or ModelMetadata()
    name = name or meta.name
    version = version or meta.version
    if not name or not version:
        raise ModelError(f"{path}: registering needs a name and a version (--name, --version or the metadata file)")
    if stage not in MODEL_STAGES:
        raise ModelError(f"stage {stage!r} is not one of {', '.join(MODEL_STAGES)}")
    existing = session.scalar(select(Model).where(Model.name == name, Model.version == version))
    if existing is not None:
        raise ModelError(f"model {name}:{version} is already registered (file {existing.uri}); choose another version")

    sha256 = file_sha256(path)
    model = load_model(path)
    outputs = int(model.output_shape[-1])
    classes = classes or meta.classes or (["defect"] if outputs == 1 else [f"class{i + 1}" for i in range(outputs)])
    if len(classes) != outputs:
        raise ModelError(f"{path}: the model has {outputs} output classes but {len(classes)} class names were given ({', '.join(classes)})")
    threshold = threshold if threshold is not None else (meta.threshold if meta.threshold is not None else 0.5)
    if not 0 < threshold < 1:
        raise ModelError(f"threshold {threshold} must be between 0 and 1")
    config = model.get_config()
    input_spec = dict(meta.input_spec or INPUT_SPEC)
    input_spec["multiple_of"] = getattr(model, "size_multiple", input_spec.get("multiple_of", 16))
    row = Model(
        name=name,
        version=version,
        uri=str(path),
        sha256=sha256,
        architecture=f"{type(model).__name__}({','.join(str(f) for f in config.get('filters', []))})",
        input_spec=input_spec,
        classes=list(classes),
        threshold=float(threshold),
        training=meta.training,
        metrics=metrics if metrics is not None else meta.metrics,
        stage=stage,
        description=description or meta.description,
    )
    session.add(row)
    session.commit()
    return row


def list_models(session: Session, name: str | None = None) -> list[Model]:
    query = select(Model).order_by(Model.name, Model.id)
    if name is not None:
        query = query.where(Model.name == name)
    return list(session.scalars(query))


def get_model(session: Session, reference: str) -> Model:
    """NAME:VERSION, or NAME for its most recently registered version."""
    name, version = parse_reference(reference)
    query = select(Model).where(Model.name == name)
    if version is not None:
        query = query.where(Model.version == version)
    row = session.scalars(query.order_by(Model.id.desc())).first()
    if row is None:
        known = ", ".join(f"{m.name}:{m.version}" for m in list_models(session)) or "none registered"
        raise ModelError(f"no model {reference} in the registry; known: {known}")
    return row


def load_registered(session: Session, reference: str):
    """(row, Keras model) after checking the file against the recorded sha256."""
    row = get_model(session, reference)
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
        "training": row.training,
        "metrics": row.metrics,
        "description": row.description,
        "registered_at": row.registered_at.isoformat() if row.registered_at else None,
    }


def register_demo(session: Session) -> Model:
    """The demo model shipped inside the package: its row, registered on first use.

    Idempotent, so that `make demo` and jobs naming `model: demo` can call it on every run; a
    row whose checksum differs from the shipped file is refused rather than silently reused.
    """
    meta = read_metadata(DEMO_METADATA)
    existing = session.scalar(select(Model).where(Model.name == meta.name, Model.version == meta.version))
    if existing is None:
        return register_model(session, DEMO_MODEL, metadata=meta)
    shipped = file_sha256(DEMO_MODEL)
    if existing.sha256 != shipped:
        raise ModelError(
            f"{DEMO_MODEL}: the registered demo model {meta.name}:{meta.version} has sha256 {existing.sha256} "
            f"but the shipped file has {shipped}; register this file under another version"
        )
    return existing


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)
