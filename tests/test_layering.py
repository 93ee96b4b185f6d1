"""The package's layers (README, "How the package is layered"): no module imports from a higher layer, not even
inside a function or under TYPE_CHECKING, and no module imports another module's private (``_x``) names."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "distill"

# Lowest first. A module may import from its own layer and the layers below it. The loss terms and their math
# sit below the settings (which derive the weights and refusals from the term registry); the objective, which
# joins the terms to a teacher source (live, cache or the other tokenizer's batch), sits above the data.
LAYERS = [
    ("distill.errors", "distill.files", "distill.dtypes", "distill.paths"),
    ("distill.models",),
    ("distill.losses",),
    ("distill.config",),
    ("distill.runtime",),
    ("distill.data",),
    ("distill.losses.objective", "distill.losses.teacher_source", "distill.losses.metrics"),
    ("distill.infer",),
    ("distill.train",),
    ("distill.finetune",),
    ("distill.commands",),
    ("distill.cli",),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of the longest prefix that names the module (``distill.losses.objective`` before
    ``distill.losses``)."""
    if module == "distill":  # the package's own __init__: its version, nothing else
        return 0
    named = [(len(p), i) for i, prefixes in enumerate(LAYERS) for p in prefixes
             if module == p or module.startswith(p + ".")]
    assert named, f"{module} is in no layer: add it to LAYERS (and to the README's layering)"
    return max(named)[1]


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import of a distill module in ``path``."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "distill"]
        elif isinstance(node, ast.ImportFrom):
            target = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            if target.split(".")[0] == "distill":
                found.append((node.lineno, target, [a.name for a in node.names]))
    return found


def modules() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_every_module_has_a_layer():
    for path in modules():
        layer_of(module_name(path))


def test_no_import_runs_upward():
    upward = []
    for path in modules():
        here = module_name(path)
        for line, target, names in imports(path):
            # ``from distill.x import y`` may name a module y: its layer is the one that counts
            targets = [f"{target}.{n}" if (ROOT.parent / f"{target}.{n}".replace(".", "/")).exists()
                       or (ROOT.parent / (f"{target}.{n}".replace(".", "/") + ".py")).exists() else target
                       for n in names] or [target]
            for t in targets:
                if layer_of(t) > layer_of(here):
                    upward.append(f"{here}:{line} imports {t}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_private_name_crosses_modules():
    crossing = []
    for path in modules():
        here = module_name(path)
        for line, target, names in imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private or any(part.startswith("_") and not part.startswith("__") for part in target.split(".")):
                crossing.append(f"{here}:{line} imports {', '.join(private) or target} from {target}")
    assert not crossing, "private names imported across modules:\n" + "\n".join(crossing)


def test_the_checks_see_an_upward_import(tmp_path, monkeypatch):
    """The checks themselves: a bottom module importing the trainer, inside a function, is caught."""
    fake = tmp_path / "distill"
    (fake / "train").mkdir(parents=True)
    (fake / "files.py").write_text("def f():\n    from distill.train.loop import Trainer\n    from distill.errors import _x\n")
    (fake / "train" / "loop.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    with pytest.raises(AssertionError, match="distill.files:2 imports distill.train.loop"):
        test_no_import_runs_upward()
    with pytest.raises(AssertionError, match="distill.files:3 imports _x from distill.errors"):
        test_no_private_name_crosses_modules()
