"""A pre-training corpus of prose people wrote, that any Debian machine gets through apt alone: the Python
documentation's reStructuredText sources (``python3-doc``, and the ``python3.X-doc`` it depends on) and the
Linux man-pages project (``manpages``, ``manpages-dev``), rendered with groff.

What is kept. Paragraphs (blank-line separated) of running text: reST code blocks (the indented block
after a ``::`` paragraph), directives (``..``), doctests (``>>>``), tables and section underlines go; inline
roles (``:class:`json.JSONDecoder``` -> ``json.JSONDecoder``) and markup characters are reduced to their
text; the "What's New" and changelog pages go. A paragraph needs ``--min-chars`` characters, 80% of them
letters or spaces; one seen twice (lower-cased) is kept once.

Splits. Each source file (a doc page, a man page) goes wholly to train or validation by a hash of its
name (95/5), the same on every machine. ``manifest.json`` records the packages' versions, the counts and
the corpus' sha256: apt serves the current release's versions, so another release gives another corpus.

    python benchmarks/prose_corpus.py --out data/prose [--cache runs/prose-debs]

Output: ``train.jsonl`` / ``validation.jsonl`` with one ``{"text": paragraph}`` per line, ready for
``data.objective`` with ``data.source_column=text data.target_column=null``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

PACKAGES = ("python3-doc", "manpages", "manpages-dev")
VALIDATION_PERCENT = 5
ROLE = re.compile(r":[\w:.-]+:`(?:[^`<]*<)?([^`>]+)>?`")
INLINE = re.compile(r"``([^`]+)``|`([^`]+)`_{0,2}|\*\*([^*]+)\*\*|\*([^*]+)\*")
SKIPPED_PAGES = re.compile(r"(^|/)(whatsnew|changelog)")


def rst_paragraphs(text: str) -> list[str]:
    """The running-text paragraphs of a reST page, markup reduced to its text."""
    out, code_follows, in_code = [], False, False
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or not block.strip():
            continue
        indented = lines[0].startswith((" ", "\t"))
        if in_code and indented:
            continue  # still inside the literal block after "::"
        in_code = code_follows and indented
        if in_code:
            continue
        first = lines[0].strip()
        code_follows = block.rstrip().endswith("::")
        if indented or first.startswith(("..", ">>>", "+", "|", "=", "*", "-", "#")) or \
                any(set(line.strip()) <= set("=-~^\"'`#*+") and line.strip() for line in lines):
            continue  # directives, doctests, tables, lists, headings with their underlines
        paragraph = " ".join(line.strip() for line in lines)
        paragraph = ROLE.sub(r"\1", paragraph)
        paragraph = INLINE.sub(lambda m: next(g for g in m.groups() if g is not None), paragraph)
        out.append(paragraph.rstrip(":") + ("." if paragraph.endswith("::") else ""))
    return out


def man_paragraphs(rendered: str) -> list[str]:
    """The running-text paragraphs of a man page rendered by groff (plain text, no overstrikes)."""
    out = []
    for block in re.split(r"\n\s*\n", rendered):
        # section headings start at the margin, the text is indented
        lines = [line.strip() for line in block.splitlines() if line[:1] in (" ", "\t") and line.strip()]
        if not lines:
            continue
        if any(line.startswith(("#", "$ ", "%")) or line.endswith((";", "{", "}")) for line in lines):
            continue  # code examples
        out.append(re.sub(r"(\w)[-\u2010] (\w)", r"\1\2", " ".join(lines)))  # words hyphenated at a line end
    return out


def keep(paragraph: str, min_chars: int) -> bool:
    letters = sum(c.isalpha() or c == " " for c in paragraph)
    return len(paragraph) >= min_chars and letters >= 0.8 * len(paragraph)


def split_of(name: str) -> str:
    return "validation" if int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < VALIDATION_PERCENT else "train"


def fetch(cache: Path) -> dict[str, str]:
    """Download and unpack the packages into ``cache`` (apt-get download: no install, no root needed);
    returns {package: version}."""
    cache.mkdir(parents=True, exist_ok=True)
    depends = subprocess.run(["apt-cache", "depends", "python3-doc"], capture_output=True, text=True, check=True).stdout
    versioned = sorted(set(re.findall(r"Depends: (python3\.\d+-doc)", depends)))
    names = [*PACKAGES, *versioned]
    subprocess.run(["apt-get", "download", *names], cwd=cache, check=True, capture_output=True)
    versions = {}
    for deb in sorted(cache.glob("*.deb")):
        name, version = deb.name.split("_")[:2]
        versions[name] = version
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cache / "root")], check=True)
    return versions


def documents(root: Path):
    """(name, paragraphs) of every doc page and man page under the unpacked packages, in sorted order."""
    for page in sorted(root.glob("usr/share/doc/python3*/html/_sources/**/*.rst.txt")):
        name = str(page.relative_to(root))
        if not SKIPPED_PAGES.search(name.split("_sources/", 1)[1]):
            yield name, rst_paragraphs(page.read_text(errors="replace"))
    for page in sorted(root.glob("usr/share/man/man*/*.gz")):
        source = gzip.decompress(page.read_bytes())
        if source.startswith(b".so "):
            continue  # a link to another page
        rendered = subprocess.run(["groff", "-man", "-Tutf8", "-P-cbou", "-rLL=200n", "-rHY=0"], input=source,
                                  capture_output=True, env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"}).stdout
        yield str(page.relative_to(root)), man_paragraphs(rendered.decode("utf-8", errors="replace"))


def build(root: Path, out: Path, min_chars: int, versions: dict[str, str]) -> dict:
    from distill.files import building

    seen: set[str] = set()
    counts = {"train": 0, "validation": 0, "documents": 0, "duplicates": 0}
    digest = hashlib.sha256()
    with building(out) as tmp:
        files = {s: open(tmp / f"{s}.jsonl", "w") for s in ("train", "validation")}
        for name, paragraphs in documents(root):
            counts["documents"] += 1
            split = split_of(name)
            for p in paragraphs:
                p = " ".join(p.split())
                key = p.lower()
                if not keep(p, min_chars):
                    continue
                if key in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(key)
                line = json.dumps({"text": p}, ensure_ascii=False) + "\n"
                files[split].write(line)
                digest.update(line.encode())
                counts[split] += 1
        for f in files.values():
            f.close()
        manifest = {"packages": versions, "counts": counts, "min_chars": min_chars, "sha256": digest.hexdigest(),
                    "megabytes": round(sum((tmp / f"{s}.jsonl").stat().st_size for s in files) / 1e6, 2)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cache", type=Path, default=Path("runs/prose-debs"), help="where the packages are unpacked")
    p.add_argument("--min-chars", type=int, default=80)
    a = p.parse_args()
    versions = fetch(a.cache)
    print(json.dumps(build(a.cache / "root", a.out, a.min_chars, versions), indent=2))


if __name__ == "__main__":
    main()
