"""The structure docs/architecture.md describes, checked on the source so it stays true.

- Layers point down: each package imports only the layers below it (and the foundation modules);
  db/ reads no pixels, data/ runs no model.
- Functions read as a short list of steps: at most 80 lines; outside click commands at most 6
  positional parameters (keyword-only options are fine).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "inspect" / "defectscan"

# Top-level modules every layer may import: errors, settings, paths, logging, times, provenance.
FOUNDATION = {"errors", "exitcodes", "paths", "secrets", "yamlfile", "native_logs", "logs", "interrupts", "config", "provenance", "times",
              "users"}
# What each layer may import besides the foundation and itself.
ALLOWED = {
    "foundation": set(),
    "db": set(),
    "data": {"db"},
    "model": {"db", "data"},
    "pipeline": {"db", "data", "model"},
    "jobs": {"db", "data", "model", "pipeline"},
    "report": {"db", "data", "model"},
    "review": {"db", "data", "model", "report"},
    "cli": {"db", "data", "model", "pipeline", "jobs", "report", "review"},
    "top": {"db", "data", "model", "pipeline", "jobs", "report", "review", "cli"},  # demo.py, __main__.py
}
# Libraries a layer must not import: the database layer reads no pixels, data loads no model runtime.
FORBIDDEN = {
    "foundation": {"zarr", "tensorflow", "keras", "distributed"},
    "db": {"zarr", "tensorflow", "keras", "distributed"},
    "data": {"tensorflow", "keras", "distributed"},
}
MAX_LINES = 80
MAX_POSITIONAL = 6


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted(SOURCE.rglob("*.py"))]


def _layer(path: Path) -> str:
    parts = path.relative_to(SOURCE).parts
    if len(parts) > 1:
        return parts[0]
    name = parts[0][: -len(".py")]
    if name in FOUNDATION or name == "__init__":
        return "foundation"
    return "top"


def _imports(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "defectscan" else [])
            yield node.lineno, names
        elif isinstance(node, ast.Import):
            yield node.lineno, [alias.name for alias in node.names]


def _target(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "defectscan" or len(parts) == 1:
        return None
    return "foundation" if parts[1] in FOUNDATION or parts[1] == "__version__" else parts[1] if len(parts) > 1 else None


def test_every_module_is_in_a_known_layer():
    unknown = sorted({f"{path.relative_to(SOURCE)}" for path, _ in _modules() if _layer(path) not in ALLOWED})
    assert not unknown, f"modules in no layer of tests/test_architecture.py (add the package to ALLOWED and docs/architecture.md): {unknown}"


def test_layers_import_only_the_layers_below():
    wrong = []
    for path, tree in _modules():
        layer = _layer(path)
        for line, names in _imports(tree):
            for name in names:
                target = _target(name)
                if target is not None and target not in {layer, "foundation", *ALLOWED[layer]}:
                    wrong.append(f"{path.relative_to(SOURCE)}:{line} ({layer}) imports {name} ({target})")
                if name.split(".")[0] in FORBIDDEN.get(layer, ()):
                    wrong.append(f"{path.relative_to(SOURCE)}:{line} ({layer}) imports {name}")
    assert not wrong, "imports against the layers of docs/architecture.md:\n" + "\n".join(wrong)


def _functions():
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield path, node


def _is_click_command(node: ast.FunctionDef) -> bool:
    return any("command" in ast.unparse(d) or "option" in ast.unparse(d) or "argument" in ast.unparse(d) for d in node.decorator_list)


def test_no_function_is_longer_than_80_lines():
    long = [f"{path.relative_to(SOURCE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, node in _functions() if node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, "split these into named steps:\n" + "\n".join(long)


def test_no_function_outside_click_commands_takes_more_than_6_positional_parameters():
    many = []
    for path, node in _functions():
        positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
        if len(positional) > MAX_POSITIONAL and not _is_click_command(node):
            many.append(f"{path.relative_to(SOURCE)}:{node.lineno} {node.name}({', '.join(positional)})")
    assert not many, "make the options keyword-only, or pass a context object:\n" + "\n".join(many)


@pytest.mark.parametrize("source, layer, wrong", [
    ("from defectscan.model.preprocess import as_uint8\n", "data", "model"),
    ("import zarr\n", "db", "zarr"),
    ("from defectscan.pipeline import run\n", "report", "pipeline"),
])
def test_the_layer_check_catches_an_import_against_the_layers(source, layer, wrong):
    """The scan itself: a module importing upwards is reported (so an empty report means something)."""
    tree = ast.parse(source)
    found = [(name, _target(name)) for _, names in _imports(tree) for name in names]
    bad = [name for name, target in found
           if (target is not None and target not in {layer, "foundation", *ALLOWED[layer]}) or name.split(".")[0] in FORBIDDEN.get(layer, ())]
    assert bad and wrong in bad[0]
