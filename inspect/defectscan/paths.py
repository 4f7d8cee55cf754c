"""Where the files that live outside the Python package are found.

In a checkout (editable install) configs/ and migrations/ sit at the repository root; in a
wheel they are packed into the package as _configs/ and _migrations/ (see pyproject.toml).
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
# The checkout holding this package (in a wheel install: site-packages' parent, which holds no jobs/ or var/).
REPO_ROOT = _PACKAGE.parent.parent


def _find(packed: str, top_level: str) -> Path:
    inside = _PACKAGE / packed
    if inside.is_dir():
        return inside
    return REPO_ROOT / top_level


CONFIGS_DIR = _find("_configs", "configs")
MIGRATIONS_DIR = _find("_migrations", "migrations")
DEFAULTS_FILE = CONFIGS_DIR / "defaults.yaml"
# The demo model shipped inside the package (model/demo/), and its metadata: its registered name lives there.
DEMO_DIR = _PACKAGE / "model" / "demo"
DEMO_MODEL = DEMO_DIR / "tinyunet-synth-demo.keras"
DEMO_METADATA = DEMO_DIR / "tinyunet-synth-demo.json"
