"""Settings: configs/defaults.yaml < --config FILE < DEFECTSCAN_* environment < CLI flags.

Each layer is a plain dict; the merged dict is validated once into `Settings`. Every key
remembers which layer set it, so a bad value is reported with the file or variable it came
from, the key, the value and what is accepted.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from defectscan.errors import ConfigError, first_line
from defectscan.paths import DEFAULTS_FILE
from defectscan.secrets import mask_secrets
from defectscan.yamlfile import Section, read_mapping

ENV_PREFIX = "DEFECTSCAN_"
# Not settings: DEFECTSCAN_CONFIG names the --config file, DEFECTSCAN_CHROMIUM the browser that prints
# PDF reports (report/pdf.py), DEFECTSCAN_TEST_* configure the test suite; the deployment's own variables
# (deploy/compose: IMAGE, TARGET, DATA; deploy/tls/make-certs.sh: CERT_DAYS) are exported on the same hosts.
_NOT_SETTINGS = ("DEFECTSCAN_CONFIG", "DEFECTSCAN_CHROMIUM", "DEFECTSCAN_IMAGE", "DEFECTSCAN_TARGET", "DEFECTSCAN_DATA",
                 "DEFECTSCAN_CERT_DAYS")
_TEST_ENV_PREFIX = "DEFECTSCAN_TEST_"
# Kubernetes' service links: for a Service named defectscan-scheduler (the DaskCluster's), every pod of the
# namespace gets DEFECTSCAN_SCHEDULER_SERVICE_HOST, DEFECTSCAN_SCHEDULER_PORT_8786_TCP and so on: not settings.
_SERVICE_LINK = re.compile(r"^DEFECTSCAN_(?!.*__)([A-Z0-9_]+_)?(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_[A-Z]+)?)?)$")
_NESTED = "__"


class _Section(Section):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSSettings(_Section):
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None

    @model_validator(mode="after")
    def _all_or_none(self) -> TLSSettings:
        given = [self.ca_file, self.cert_file, self.key_file]
        if any(given) and not all(given):
            raise ValueError("give all three of ca_file, cert_file, key_file, or none")
        return self

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None


_SCHEDULER = re.compile(r"^(tcp|tls|ucx|inproc)://[^/\s]+$")


def check_scheduler(value: str | None) -> str | None:
    """A scheduler address, or `local` (a local cluster for the run); anything else refused. An empty value (an env-file
    line left empty, an unset ${VAR}) quietly started a local cluster on the machine of the run instead of the plant's."""
    if value is None or value.strip().lower() == "local":
        return None if value is None else "local"
    value = value.strip().rstrip("/")
    if re.match(r"^[^/\s:]+:\d+$", value):
        value = f"tcp://{value}"  # host:port, as distributed takes it
    if not _SCHEDULER.match(value):
        raise ValueError("expected `local` or a scheduler address such as tls://dask-scheduler:8786")
    return value


class ClusterSettings(_Section):
    scheduler: str | None
    n_workers: int | None = Field(ge=1)
    threads_per_worker: int = Field(ge=1)
    memory_limit: str | int
    shards_in_flight_per_worker: int = Field(ge=1)
    tls: TLSSettings

    @field_validator("scheduler")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        checked = check_scheduler(value)
        return None if checked == "local" else checked


class InspectionSettings(_Section):
    batch_size: int = Field(ge=1)
    max_batch_pixels: int = Field(ge=1)
    runtime: Literal["tensorflow", "jax"]
    precision: Literal["recorded", "float32"]
    images_per_shard: int = Field(ge=1)
    tile_size: int = Field(ge=16)
    halo: int = Field(ge=0)
    tile_batch_size: int = Field(ge=1)
    threshold: float | None = Field(gt=0, lt=1)
    min_defect_area: int | None = Field(ge=1)
    fail_score: float | None = Field(ge=0, le=1)
    output_dir: Path | None
    heartbeat_s: float = Field(gt=0)
    stale_run_after_s: float = Field(gt=0)
    stop_within_s: float = Field(gt=0)
    shard_timeout_s: float | None = Field(gt=0)

    @model_validator(mode="after")
    def _whole_batches(self) -> InspectionSettings:
        if self.images_per_shard % self.batch_size:
            raise ValueError(f"images_per_shard ({self.images_per_shard}) must be a multiple of batch_size ({self.batch_size})")
        if self.stale_run_after_s < 3 * self.heartbeat_s:
            # A live run must beat several times within the staleness window, or a slow beat abandons it.
            raise ValueError(f"stale_run_after_s ({self.stale_run_after_s:g}) must be at least 3 x heartbeat_s ({self.heartbeat_s:g})")
        return self


class QASettings(_Section):
    hold_above: float = Field(ge=0, le=1)


class Settings(Section):
    """Validated settings. Defaults live in configs/defaults.yaml, not here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path | None
    database_url: str | None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]
    cluster: ClusterSettings
    inspection: InspectionSettings
    qa: QASettings

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, value: Any) -> Any:
        # As --log-level takes it: debug, Debug and DEBUG alike.
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _parse_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError("expected a URL such as sqlite:///path/to/file.sqlite or postgresql://user@host/db") from None
        backend = url.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"database backend '{backend}' is not supported; accepted: sqlite, postgresql")
        if backend == "sqlite" and (url.host or url.database in (None, "", ":memory:")):
            # sqlite://x.sqlite names a host, not a file; an in-memory database is gone when the command ends, so
            # `db upgrade` "succeeded" and the next command found no schema.
            raise ValueError("expected a SQLite file: sqlite:///relative/path.sqlite or sqlite:////absolute/path.sqlite (three or four slashes)")
        try:
            url.get_dialect()().create_connect_args(url)  # the driver's own reading of the URL's options (?timeout=...)
        except Exception as exc:  # noqa: BLE001 - each driver raises its own kinds
            raise ValueError(f"the driver cannot read this URL: {first_line(exc)}") from None
        return value

    @property
    def resolved_data_dir(self) -> Path:
        if self.data_dir is not None:
            return self.data_dir.expanduser()
        base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        return Path(base) / "defectscan"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url is not None:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir / 'defectscan.sqlite'}"


class _Null:
    """An override that sets a setting to null, where a plain None means "not given" (a flag left out)."""

    def __repr__(self) -> str:
        return "null"


NULL = _Null()


def load_settings(
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, tuple[Any, str]] | None = None,
) -> Settings:
    """Merge the layers and validate them.

    `overrides` maps a key to (value, source), the source being the flag that set it, e.g.
    {"database_url": (url, "--database-url")}; nested keys are joined by "." or "__" (as in the
    environment: "inspection__batch_size"); None values are left out, NULL ones set the key to null.
    """
    merged: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}

    _merge(merged, origin, _read_yaml(DEFAULTS_FILE), str(DEFAULTS_FILE))
    if config_file is not None:
        _merge(merged, origin, _read_yaml(Path(config_file)), str(config_file))
    for key, value, source in _environment_layer(os.environ if environ is None else environ):
        _merge(merged, origin, _nest(key, value), source)
    for key, (value, source) in (overrides or {}).items():
        if value is not None:
            _merge(merged, origin, _nest(tuple(key.replace(_NESTED, ".").split(".")), None if value is NULL else value), source)

    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, merged, origin)) from None


@functools.cache
def shipped_defaults() -> Settings:
    """configs/defaults.yaml alone: the defaults of library functions called without settings."""
    return load_settings(environ={})


def _read_yaml(path: Path) -> dict[str, Any]:
    return read_mapping(path, what="settings file", contents="settings", error=ConfigError)


def _environment_layer(environ: Mapping[str, str]):
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name.startswith(_TEST_ENV_PREFIX) or name in _NOT_SETTINGS or _SERVICE_LINK.match(name):
            continue
        key = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split(_NESTED))
        yield key, environ[name], f"environment variable {name}"


def _nest(key: tuple[str, ...], value: Any) -> dict[str, Any]:
    for part in reversed(key[1:]):
        value = {part: value}
    return {key[0]: value}


def _merge(into: dict[str, Any], origin: dict[tuple[str, ...], str], layer: dict[str, Any], source: str, prefix: tuple[str, ...] = ()) -> None:
    for key, value in layer.items():
        path = (*prefix, str(key))
        if value is None and isinstance(into.get(key), dict):
            continue  # a section left empty (`inspection:` with its keys commented out) sets nothing
        if isinstance(value, dict):
            # Recurse even into new sections, so every leaf remembers its own layer.
            if not isinstance(into.get(key), dict):
                into[key] = {}
                origin[path] = source
            _merge(into[key], origin, value, source, path)
        else:
            into[key] = value
            # Re-inserted so the dict's order is the order in which layers set keys; a section replaced by a
            # value forgets where its keys came from, so an error names this layer.
            for inner in [p for p in origin if p[: len(path)] == path]:
                origin.pop(inner)
            origin[path] = source


def _describe(exc: ValidationError, merged: dict[str, Any], origin: dict[tuple[str, ...], str]) -> str:
    lines = []
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        dotted = ".".join(loc)
        source = _source_of(loc, origin)
        if error["type"] == "extra_forbidden":
            accepted = ", ".join(_accepted_keys(loc[:-1]))
            lines.append(f"{source}: unknown key '{dotted}'; accepted keys: {accepted}")
            continue
        value = error.get("input")
        message = error["msg"].removeprefix("Value error, ")
        if isinstance(value, dict):
            # A rule across several keys of a section: the section is what to fix.
            lines.append(f"{source}: section '{dotted}': {message}")
            continue
        # Masked whatever its type: a URL inside a list is a password all the same.
        shown = repr(value) if isinstance(value, (int, float, bool)) or value is None else mask_secrets(repr(value))
        lines.append(f"{source}: key '{dotted}' has value {shown}: {message}")
    return "; ".join(lines)


def _source_of(loc: tuple[str, ...], origin: dict[tuple[str, ...], str]) -> str:
    """The layer that set `loc`, or for a whole section the last layer that set a key inside it."""
    inside = [source for path, source in origin.items() if path[: len(loc)] == loc and len(path) > len(loc)]
    if inside:
        return inside[-1]
    for n in range(len(loc), 0, -1):
        if loc[:n] in origin:
            return origin[loc[:n]]
    return "settings"


def _accepted_keys(parent: tuple[str, ...]) -> list[str]:
    model: type[BaseModel] = Settings
    for part in parent:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)
