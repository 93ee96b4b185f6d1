"""Offline demo assets: a synthetic summarization corpus, a tokenizer trained on it, and a tiny BART init.

Nothing here downloads anything. The corpus is deterministic for a seed and is built so that a
small transformer can learn it in a few hundred steps, while still having to do real work:

* a document (6-9 sentences, 60-110 words) is about one *main* person, introduced in the first
  sentence; 2-3 facts about that person (job, home city, a count of owned objects, birth year) are
  stated with one of several paraphrase templates and scattered through the document;
* distractor sentences state the *same kinds* of facts about 1-2 other people, and filler
  sentences mention other cities and numbers;
* the summary states only the main person's facts, one short sentence each, in a single canonical
  template and a fixed order (job, home, count, year).

So the model has to find the main entity, copy names/cities/numbers and normalise the phrasing.

Public API::

    generate_corpus(n, seed) -> list[dict]            # {"id", "document", "summary"}
    write_demo_data(out_dir, seed=0, n_train=2000, n_validation=200, n_test=200, vocab_size=1536) -> dict
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from pathlib import Path

from distill.errors import DistillError
from distill.files import building
from distill.models.from_scratch import train_tokenizer

__all__ = [
    "generate_corpus",
    "token_length_stats",
    "write_demo_data",
]


# --------------------------------------------------------------------------------------------
# Vocabularies (kept small so a ~1k-token BPE covers them with mostly whole-word tokens)
# --------------------------------------------------------------------------------------------

FIRST_NAMES = [
    "Anna", "Boris", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas",
    "Karin", "Lukas", "Maria", "Nils", "Olga", "Peter", "Rosa", "Simon", "Tara", "Viktor",
    "Wanda", "Yusuf", "Zoe", "Marco", "Lena", "Omar", "Nina", "Tomas", "Sara", "Leo",
]
LAST_NAMES = [
    "Berg", "Costa", "Dahl", "Eriksen", "Fischer", "Garcia", "Hansen", "Ivanov", "Jensen", "Keller",
    "Larsen", "Moreau", "Novak", "Olsen", "Petrov", "Quinn", "Rossi", "Schmidt", "Torres", "Weber",
    "Young", "Zimmer", "Lindqvist", "Brandt", "Kowalski", "Silva", "Horvat", "Meyer", "Nilsson", "Duval",
]
CITIES = [
    "Oslo", "Lisbon", "Vienna", "Dublin", "Prague", "Madrid", "Berlin", "Athens", "Helsinki", "Warsaw",
    "Zurich", "Porto", "Bergen", "Krakow", "Lyon", "Milan", "Seville", "Ghent", "Tallinn", "Riga",
    "Geneva", "Munich", "Naples", "Valencia", "Bristol", "Glasgow", "Utrecht", "Bologna", "Gdansk", "Malmo",
]
ORGANISATIONS = [
    "Northwind", "Redstone", "Silverline", "Greenfield", "Brightwater", "Oakridge", "Stonebridge",
    "Sunhaven", "Ironwood", "Clearview", "Maplewood", "Riverton", "Goldcrest", "Highpoint",
    "Lakeside", "Westbrook", "Eastgate", "Starfield", "Pinecrest", "Harborview", "Bluepeak",
    "Copperleaf", "Foxglove", "Windmere", "Ravenhill", "Seabright", "Thornfield", "Larkspur",
]
# Roles start with a consonant so the article is always "a".
ROLES = [
    "teacher", "baker", "nurse", "pilot", "lawyer", "painter", "doctor", "farmer", "chemist",
    "designer", "manager", "writer", "tailor", "plumber", "surgeon", "banker", "journalist",
    "librarian", "mechanic", "dentist", "carpenter", "gardener", "singer", "potter",
]
OBJECTS = [
    "bicycles", "paintings", "cats", "books", "guitars", "clocks", "lamps", "boats", "chairs",
    "maps", "stamps", "coins", "plants", "hats", "rugs", "kites", "cameras", "radios", "watches",
    "violins",
]
COUNTS = list(range(2, 41))  # 39 values
YEARS = list(range(1960, 2000))  # 40 values
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]

FACT_TYPES = ("job", "home", "count", "year")  # also the canonical order in the summary

# Paraphrase templates used in documents ({e} = full name of the entity).
DOC_TEMPLATES = {
    "job": [
        "{e} works as a {role} at {org}.",
        "{e} is employed by {org} as a {role}.",
        "At {org}, {e} has a job as a {role}.",
        "{e} earns a living as a {role} for {org}.",
        "For several years {e} has worked for {org} as a {role}.",
    ],
    "home": [
        "{e} lives in {city}.",
        "{e} has made a home in {city}.",
        "These days {e} resides in the city of {city}.",
        "{e} moved to {city} and decided to stay there.",
        "The home of {e} is a small flat in {city}.",
    ],
    "count": [
        "{e} owns {n} {obj}.",
        "{e} has a collection of {n} {obj}.",
        "Over the years {e} acquired {n} {obj}.",
        "In total, {e} keeps {n} {obj} at home.",
        "Friends say that {e} has exactly {n} {obj}.",
    ],
    "year": [
        "{e} was born in {year}.",
        "{e} came into the world in {year}.",
        "The birth year of {e} is {year}.",
        "Records show that {e} was born in the year {year}.",
    ],
}
# The single canonical template per fact type used in summaries.
SUMMARY_TEMPLATES = {
    "job": "{e} works as a {role} at {org}.",
    "home": "{e} lives in {city}.",
    "count": "{e} owns {n} {obj}.",
    "year": "{e} was born in {year}.",
}
# Generic filler; some mention cities, months and numbers as distractors for the fact slots.
FILLER_TEMPLATES = [
    "The weather in {city} was unusually warm for most of that week.",
    "A new bridge opened near the old harbour last spring after long delays.",
    "Local newspapers wrote several long reports about the annual market.",
    "Many visitors came to the museum in {city} over the long weekend.",
    "The city council met on Monday to discuss the budget for next year.",
    "Traffic was heavy on the main road into {city} every morning.",
    "A small music festival took place in {city} in {month}.",
    "Prices for fresh bread and vegetables rose slightly during the year.",
    "The public library in {city} extended its opening hours in {month}.",
    "Several schools closed early because of a strong storm in {month}.",
    "The night train to {city} was delayed by almost an hour.",
    "About {n} people attended an open air concert in {city}.",
    "A football match in {city} drew a large and noisy crowd on Saturday.",
    "Around {n} new shops opened in the centre of {city} last year.",
    "The river through {city} rose quickly after heavy rain in {month}.",
    "Nobody expected the old theatre to reopen so soon after the fire.",
]

DOC_WORDS = (60, 110)
SUMMARY_WORDS = (12, 30)
DOC_SENTENCES = (6, 9)


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


def _fact_values(rng: random.Random, kind: str) -> dict:
    if kind == "job":
        return {"role": rng.choice(ROLES), "org": rng.choice(ORGANISATIONS)}
    if kind == "home":
        return {"city": rng.choice(CITIES)}
    if kind == "count":
        return {"n": rng.choice(COUNTS), "obj": rng.choice(OBJECTS)}
    return {"year": rng.choice(YEARS)}


def _filler(rng: random.Random) -> str:
    return rng.choice(FILLER_TEMPLATES).format(
        city=rng.choice(CITIES), month=rng.choice(MONTHS), n=rng.choice(COUNTS) * 10
    )


def _words(text: str) -> int:
    return len(text.split())


def _make_example(rng: random.Random) -> tuple[str, str, dict]:
    """One (document, summary, metadata) triple that satisfies the length constraints."""
    while True:
        n_distractors = rng.choice((1, 2))
        firsts = rng.sample(FIRST_NAMES, 1 + n_distractors)
        lasts = rng.sample(LAST_NAMES, 1 + n_distractors)
        people = [f"{f} {l}" for f, l in zip(firsts, lasts)]
        main, distractors = people[0], people[1:]

        # Main entity: 3 facts, or 2 facts one of which is the (longest) job fact.
        if rng.random() < 0.6:
            kinds = rng.sample(FACT_TYPES, 3)
        else:
            kinds = ["job", rng.choice(FACT_TYPES[1:])]
        facts = {k: _fact_values(rng, k) for k in kinds}
        main_sents = [rng.choice(DOC_TEMPLATES[k]).format(e=main, **v) for k, v in facts.items()]
        rng.shuffle(main_sents)

        distractor_sents = []
        for person in distractors:
            for k in rng.sample(FACT_TYPES, rng.choice((1, 2))):
                distractor_sents.append(
                    rng.choice(DOC_TEMPLATES[k]).format(e=person, **_fact_values(rng, k))
                )

        fixed = len(main_sents) + len(distractor_sents)
        lo, hi = DOC_SENTENCES
        n_fill = rng.randint(max(1, lo - fixed), max(1, hi - fixed))
        fillers = [_filler(rng) for _ in range(n_fill)]
        # Adjust length with filler sentences while staying within the sentence bounds.
        body = main_sents[1:] + distractor_sents + fillers
        while _words(" ".join([main_sents[0]] + body)) < DOC_WORDS[0] and len(body) + 1 < hi:
            body.append(_filler(rng))
        rng.shuffle(body)
        sentences = [main_sents[0]] + body
        document = " ".join(sentences)
        summary = " ".join(
            SUMMARY_TEMPLATES[k].format(e=main, **facts[k]) for k in FACT_TYPES if k in facts
        )
        if (
            DOC_WORDS[0] <= _words(document) <= DOC_WORDS[1]
            and SUMMARY_WORDS[0] <= _words(summary) <= SUMMARY_WORDS[1]
            and lo <= len(sentences) <= hi
        ):
            meta = {"entity": main, "distractors": distractors, "facts": facts}
            return document, summary, meta


def generate_corpus(
    n: int, seed: int, *, id_prefix: str | None = None, with_meta: bool = False
) -> list[dict]:
    """``n`` synthetic summarization examples, identical for the same ``seed``.

    Each item is ``{"id", "document", "summary"}``; ids are ``f"{id_prefix}-{i:06d}"`` with
    ``id_prefix`` defaulting to ``f"demo{seed}"``. ``with_meta=True`` adds a ``"meta"`` key
    (main entity, distractor names, fact values) for tests and analysis.
    """
    if not isinstance(n, int) or n < 0:
        raise DistillError(f"generate_corpus: n must be a non-negative int, got {n!r}")
    rng = random.Random(seed)
    prefix = f"demo{seed}" if id_prefix is None else id_prefix
    out = []
    for i in range(n):
        document, summary, meta = _make_example(rng)
        item = {"id": f"{prefix}-{i:06d}", "document": document, "summary": summary}
        if with_meta:
            item["meta"] = meta
        out.append(item)
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def token_length_stats(tokenizer, records: Iterable[dict]) -> dict:
    """Max / mean / p95 token counts (specials included) of documents and summaries."""
    records = list(records)
    stats = {}
    for key in ("document", "summary"):
        lens = sorted(len(ids) for ids in tokenizer([r[key] for r in records])["input_ids"])
        if not lens:
            stats[key] = {"max": 0, "mean": 0.0, "p95": 0}
            continue
        stats[key] = {
            "max": lens[-1],
            "mean": round(sum(lens) / len(lens), 2),
            "p95": lens[min(len(lens) - 1, int(0.95 * len(lens)))],
        }
    return stats


# --------------------------------------------------------------------------------------------
# Demo data directory
# --------------------------------------------------------------------------------------------

SPLITS = ("train", "validation", "test")
# Enough for the corpus to saturate; 1024 would leave organisations/roles/objects split in pieces.
DEMO_VOCAB_SIZE = 1536


def _split_seed(seed: int, split: str) -> int:
    return seed * 1000 + 1 + SPLITS.index(split)


def write_demo_data(
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_train: int = 2000,
    n_validation: int = 200,
    n_test: int = 200,
    vocab_size: int = DEMO_VOCAB_SIZE,
) -> dict:
    """Write ``train/validation/test.jsonl`` and ``tokenizer/`` (trained on the train split) to
    ``out_dir``, atomically (built in a temp dir next to it, then renamed into place).

    ``vocab_size`` is an upper bound: BPE stops when no pair occurs twice (~1.3k tokens for the
    default corpus), so every name/city/organisation/role/object is a single whole-word token.

    Returns ``{"dir", "train", "validation", "test", "tokenizer", "meta"}`` as string paths;
    ``meta.json`` records the seed, sizes and token length stats (for max_source/target_length).
    """
    from transformers import AutoTokenizer

    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    data = {
        s: generate_corpus(n, _split_seed(seed, s), id_prefix=f"{s}{seed}") for s, n in sizes.items()
    }
    # Splits are generated from different seeds; also make sure no document is shared.
    seen = {r["document"] for r in data["train"]}
    for s in ("validation", "test"):
        data[s] = [r for r in data[s] if r["document"] not in seen]
        seen.update(r["document"] for r in data[s])

    final = Path(out_dir)
    with building(final) as tmp:
        for s in SPLITS:
            with open(tmp / f"{s}.jsonl", "w", encoding="utf-8") as f:
                for r in data[s]:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        texts = [t for r in data["train"] for t in (r["document"], r["summary"])]
        train_tokenizer(texts, tmp / "tokenizer", vocab_size=vocab_size)
        tokenizer = AutoTokenizer.from_pretrained(str(tmp / "tokenizer"))
        meta = {
            "seed": seed,
            "sizes": {s: len(data[s]) for s in SPLITS},
            "vocab_size": len(tokenizer),
            "token_lengths": {s: token_length_stats(tokenizer, data[s]) for s in SPLITS},
        }
        # Not a split file name, so datasets.load_dataset(out_dir) ignores it.
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    paths = {s: str(final / f"{s}.jsonl") for s in SPLITS}
    paths.update(dir=str(final), tokenizer=str(final / "tokenizer"), meta=str(final / "meta.json"))
    return paths
