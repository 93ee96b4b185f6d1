"""A real summarization corpus that every machine with this project installed has, with no download:
the docstrings of the Python standard library and the packages installed beside it. One example per
docstring: its summary line (the target), and the source its writer had in front of them: the object's
qualified name (``json.decoder.JSONDecoder.decode``) on the first line, then the prose paragraphs after the
summary, written by people. The name belongs in the source because summaries so often restate it
(``get_default_dtype``: "Get the current default floating point dtype").

What is kept. Functions', classes' and modules' docstrings outside test directories whose summary is one
sentence-like paragraph of ``--summary-words`` and whose prose body (the paragraphs before the first
section such as ``Args:``, ``Parameters``/``-----``, ``:param``, ``>>>`` or a directive) has
``--body-words`` words, mostly ASCII. Whitespace is normalized; a docstring found twice (vendored
copies, inherited boilerplate) is kept once, in the first unit in sorted order.

Splits. A unit is a package's top-level module or subpackage (``torch/nn``, ``numpy/linalg``); each
unit goes wholly to train, validation or test by a hash of its name (90/5/5), so no source file, and no
subpackage, has examples in two splits, and the assignment is the same on every machine. The numbers of
examples depend on the installed versions; ``stats.json`` records them, the packages and a digest.

    python benchmarks/docstring_corpus.py --out data/docstrings [--site DIR ...]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

SPLITS = {"train": 90, "validation": 95, "test": 100}  # cumulative percent of the unit hash
SECTION = re.compile(r"^(args|arguments|parameters|params|returns?|yields?|raises|examples?|notes?|see also|"
                     r"attributes|references|warnings?|todo|methods|keyword arguments|other parameters)\s*:?\s*$",
                     re.IGNORECASE)
MARKUP = re.compile(r"^\s*(:\w+|>>>|\.\. |[-=~^]{3,}\s*$|\w+\s*\(.*\)\s*->|\w[\w.]*\s*:\s*[\w\[\]., |]+$)")


def _words(text: str) -> int:
    return len(text.split())


def summary_and_body(doc: str, summary_words: tuple[int, int], body_words: tuple[int, int]):
    """(summary, body) of a cleaned docstring, or None when it is not a summary with a prose body."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]
    if len(paragraphs) < 2:
        return None
    summary = " ".join(paragraphs[0].split())
    prose = []
    for paragraph in paragraphs[1:]:
        first = paragraph.splitlines()[0]
        if SECTION.match(first) or MARKUP.match(first) or any(MARKUP.match(line) for line in paragraph.splitlines()):
            break
        prose.append(" ".join(paragraph.split()))
    body = "\n".join(prose)
    ok = (summary_words[0] <= _words(summary) <= summary_words[1] and body_words[0] <= _words(body) <= body_words[1]
          and summary[0].isalpha() and not MARKUP.match(summary)
          and sum(c.isascii() for c in summary + body) >= 0.98 * len(summary + body))
    return (summary, body) if ok else None


def unit_of(path: Path, site: Path) -> str:
    parts = path.relative_to(site).parts
    return "/".join(parts[:2]).removesuffix(".py")


def split_of(unit: str) -> str:
    bucket = int(hashlib.sha256(unit.encode()).hexdigest(), 16) % 100
    return next(name for name, bound in SPLITS.items() if bucket < bound)


DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def module_name(path: Path, site: Path) -> str:
    parts = path.relative_to(site).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _defs(node: ast.AST):
    """The classes and functions defined directly in node's scope, under if/try/with blocks too."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, DEFS):
            yield child
        else:
            yield from _defs(child)


def _named_docstrings(node: ast.AST, name: str):
    doc = ast.get_docstring(node, clean=True)
    if doc:
        yield name, doc
    for child in _defs(node):
        yield from _named_docstrings(child, f"{name}.{child.name}")


def docstrings(path: Path, module: str):
    """(qualified name, docstring) of the module and of every class and function in it, nested ones too."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        yield from _named_docstrings(tree, module)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError, RecursionError):
        return


def python_files(site: Path):
    for path in sorted(site.rglob("*.py")):
        rel = path.relative_to(site).parts
        if any(p in ("test", "tests", "testing", "__pycache__", "site-packages", "dist-packages")
               or p.endswith((".dist-info", ".egg-info"))
               for p in rel[:-1]) or rel[-1].startswith("test_") or path.stat().st_size > 2_000_000:
            continue
        yield path


def build(sites: list[Path], out: Path, summary_words: tuple[int, int], body_words: tuple[int, int]) -> dict:
    from distill.files import building

    seen: set[str] = set()
    rows: dict[str, list[dict]] = {name: [] for name in SPLITS}
    units: dict[str, set[str]] = {name: set() for name in SPLITS}
    for site in sites:
        for path in python_files(site):
            unit = unit_of(path, site)
            for name, doc in docstrings(path, module_name(path, site)):
                pair = summary_and_body(doc, summary_words, body_words)
                if pair is None:
                    continue
                key = hashlib.sha256("\0".join(pair).encode()).hexdigest()
                if key in seen:
                    continue
                seen.add(key)
                split = split_of(unit)
                units[split].add(unit)
                rel = path.relative_to(site).as_posix()
                rows[split].append({"id": f"{rel}:{name}", "document": f"{name}\n{pair[1]}", "summary": pair[0],
                                    "unit": unit})
    digest = hashlib.sha256()
    with building(out) as tmp:
        for split, items in rows.items():
            with open(tmp / f"{split}.jsonl", "w") as f:
                for row in items:
                    line = json.dumps(row, ensure_ascii=False)
                    f.write(line + "\n")
                    digest.update(line.encode())
        packages = sorted({u.split("/")[0] for names in units.values() for u in names})
        stats = {"examples": {k: len(v) for k, v in rows.items()}, "units": {k: len(v) for k, v in units.items()},
                 "packages": packages, "sites": [str(s) for s in sites], "sha256": digest.hexdigest(),
                 "summary_words": list(summary_words), "body_words": list(body_words)}
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--site", type=Path, action="append",
                        help="a directory of Python sources (repeatable); default: this interpreter's standard "
                             "library and site-packages")
    parser.add_argument("--summary-words", type=int, nargs=2, default=(4, 30), metavar=("MIN", "MAX"))
    parser.add_argument("--body-words", type=int, nargs=2, default=(15, 300), metavar=("MIN", "MAX"))
    args = parser.parse_args()
    sites = args.site or sorted({Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib", "platlib")})
    for site in sites:
        if not site.is_dir():
            raise SystemExit(f"docstring_corpus: {site} is not a directory")
    stats = build(sites, args.out, tuple(args.summary_words), tuple(args.body_words))
    print(json.dumps({k: v for k, v in stats.items() if k != "packages"}, indent=2))
    print(f"{len(stats['packages'])} packages; written to {args.out}")


if __name__ == "__main__":
    main()
