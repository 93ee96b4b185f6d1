"""ROUGE evaluation of generated summaries, as Shleifer & Rush 2020 report it.

What: ROUGE-1/2/L/Lsum F1 x 100 with Porter stemming, computed per example by the rouge-score
package, then aggregated with a bootstrap over examples; the reported number is the bootstrap mid
(median of the resampled means), with the low/high confidence bounds alongside.

Why this shape: the published distilbart numbers come from rouge-score, so the scores themselves are
left to it. Two things around it are ours:

* Sentence splitting for ROUGE-Lsum. rouge-score's Lsum reads sentence boundaries from newlines only
  (its own ``split_summaries`` option needs nltk's punkt data, which cannot be downloaded offline),
  so ``split_sentences`` is a small regex splitter that needs no data.
* The bootstrap, vectorised with numpy and seeded, so that reruns give identical numbers and 10k
  examples aggregate in well under a second.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from distill.errors import DistillError
from distill.files import write_atomic
from distill.paths import is_local_path

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# A sentence ends at a run of . ! ? plus any closing quotes/brackets, when whitespace and then an
# uppercase letter, a digit or an opening quote/bracket follow. Requiring the whitespace keeps
# decimals ("3.5") and dotted words ("e.g.,") whole; requiring an uppercase/digit/quote start keeps
# "p.m. on Monday" whole.
_CLOSERS = "\"'\u201d\u2019)]"
_OPENERS = "\"'\u201c\u2018(["
_BOUNDARY = re.compile(rf"[.!?]+[{re.escape(_CLOSERS)}]*(?=\s+[A-Z0-9{re.escape(_OPENERS)}])")

# A final "." that belongs to an abbreviation, not to the sentence: titles and "vs" only; words such as "etc."
# or "Inc." end sentences too often to be treated as never ending one.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt gen gov sen rep rev lt col capt sgt vs".split()
)
# Dotted acronyms and Latin abbreviations: "U.S.", "U.K.", "e.g.", "i.e.", "a.m.".
_DOTTED = re.compile(r"(?:[A-Za-z]\.){2,}")
# A single capital initial: "J." in "J. K. Rowling".
_INITIAL = re.compile(r"[A-Z]\.")


def _ends_with_abbreviation(text: str, end: int) -> bool:
    """Whether the word ending at ``text[end - 1]`` (a ".") is a known abbreviation."""
    word = text[:end].rsplit(None, 1)[-1].lstrip(_OPENERS)
    return (
        word[:-1].lower() in _ABBREVIATIONS
        or _DOTTED.fullmatch(word) is not None
        or _INITIAL.fullmatch(word) is not None
    )


def _split_line(line: str) -> list[str]:
    pieces, start = [], 0
    for match in _BOUNDARY.finditer(line):
        # Only a lone "." can be an abbreviation's; "?", "!" and "..." always end the sentence.
        if match.group() == "." and _ends_with_abbreviation(line, match.end()):
            continue
        pieces.append(line[start : match.end()])
        start = match.end()
    pieces.append(line[start:])
    return pieces


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences with a regex, needing no downloaded data.

    Splits on existing newlines, and after ``.``, ``!`` or ``?`` (optionally followed by closing
    quotes or brackets) when whitespace and then an uppercase letter, a digit or an opening quote
    follow. A lone ``.`` ending a title ("Mr.", "Dr."), a dotted abbreviation ("U.S.", "e.g.") or a
    single capital initial ("J.") does not end a sentence, at the price of missing the rare sentence
    that really ends with one ("... moved to the U.S. Then ..."). Pieces are stripped; empty pieces
    are dropped.
    """
    sentences = []
    for line in text.splitlines():
        sentences.extend(piece.strip() for piece in _split_line(line))
    return [s for s in sentences if s]


def _check_texts(name: str, texts: Sequence[str]) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DistillError(f"{name}[{i}] must be a string, got {type(text).__name__}")


def rouge_scores(predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    """Per-example ROUGE-1/2/L/Lsum F1 x 100 (Porter stemming), one dict per example."""
    if len(predictions) != len(references):
        raise DistillError(
            f"got {len(predictions)} predictions but {len(references)} references; they must pair up"
        )
    _check_texts("predictions", predictions)
    _check_texts("references", references)
    # Imported here so that importing distill does not need rouge-score (and its nltk import).
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(ROUGE_TYPES, use_stemmer=True)
    results = []
    for prediction, reference in zip(predictions, references):
        # rouge-score's Lsum takes sentence boundaries from newlines; the other types ignore them.
        scores = scorer.score("\n".join(split_sentences(reference)), "\n".join(split_sentences(prediction)))
        results.append({t: 100.0 * scores[t].fmeasure for t in ROUGE_TYPES})
    return results


def _resample_means(matrix: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``samples`` resamples (with replacement) of the rows of ``matrix``: (samples, k)."""
    n = matrix.shape[0]
    # One contiguous array per score: gathering from it is several times faster than gathering
    # whole rows of the (n, k) matrix and averaging over a strided axis.
    columns = np.ascontiguousarray(matrix.T)
    # Chunked so that each block of indices stays near 2M entries (16 MB) whatever n is; the chunk
    # size depends on n only, so the draws, and hence the result, are fixed by the seed.
    chunk = max(1, 2_000_000 // n)
    means = np.empty((samples, matrix.shape[1]))
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        for j, column in enumerate(columns):
            means[start:stop, j] = column[idx].mean(axis=1)
    return means


def bootstrap(
    per_example: list[dict[str, float]], samples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[str, dict[str, float]]:
    """Bootstrap confidence interval of the mean of each score, like rouge-score's BootstrapAggregator.

    Resamples the examples with replacement ``samples`` times and takes each resample's mean; per
    score, "mid" is the median of those means and "low"/"high" the (1 - confidence)/2 and
    (1 + confidence)/2 percentiles. Unlike rouge-score's aggregator it uses its own seeded generator,
    so the result does not depend on numpy's global random state.
    """
    if not per_example:
        raise DistillError("no examples to aggregate: the score list is empty")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise DistillError(f"bootstrap samples must be a positive integer, got {samples!r}")
    if not 0 < confidence < 1:
        raise DistillError(f"bootstrap confidence must be between 0 and 1 (exclusive), got {confidence!r}")
    keys = list(per_example[0])
    for i, scores in enumerate(per_example):
        if list(scores) != keys:
            raise DistillError(f"example {i} has scores {sorted(scores)}, expected {sorted(keys)}")
    matrix = np.array([[scores[k] for k in keys] for scores in per_example], dtype=np.float64)
    means = _resample_means(matrix, samples, np.random.default_rng(seed))
    delta = (1 - confidence) / 2
    low, mid, high = np.percentile(means, [100 * delta, 50, 100 * (1 - delta)], axis=0)
    return {k: {"low": float(low[j]), "mid": float(mid[j]), "high": float(high[j])} for j, k in enumerate(keys)}


def rouge(predictions: list[str], references: list[str], samples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Corpus ROUGE as a flat dict for reports and TensorBoard.

    ``{"rouge1": mid, "rouge1_low": low, "rouge1_high": high, ..., "n": number of examples}``.
    """
    aggregated = bootstrap(rouge_scores(predictions, references), samples=samples, seed=seed)
    flat: dict[str, float] = {}
    for t in ROUGE_TYPES:
        flat[t] = aggregated[t]["mid"]
        flat[f"{t}_low"] = aggregated[t]["low"]
        flat[f"{t}_high"] = aggregated[t]["high"]
    flat["n"] = len(predictions)
    return flat


def _format_cell(value: object) -> str:
    # Counts such as n print as integers; bool is an int subclass but is not a count.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def markdown_table(rows: Mapping[str, Mapping[str, float]], columns: list[str]) -> str:
    """A markdown table: one row per model (first column "model"), one column per metric.

    Floats print with 2 decimals, integers (such as n) as they are; a metric a model lacks prints as
    "-" so that runs evaluated on different metric sets can share a table. Metric columns are
    right-aligned so that decimals line up in a plain-text view.
    """
    lines = [
        "| " + " | ".join(["model", *columns]) + " |",
        "|" + "|".join(["---", *("---:" for _ in columns)]) + "|",
    ]
    for model, metrics in rows.items():
        cells = [str(model), *(_format_cell(metrics[c]) if c in metrics else "-" for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def model_names(paths: list[str], names: Optional[list[str]] = None) -> list[str]:
    """One unique, file-safe name per model: ``names`` when given, else the shortest tail of each path
    that tells the models apart (runs/A/final and runs/B/final become A_final and B_final)."""
    if names:
        if len(names) != len(paths):
            raise DistillError(f"got {len(names)} --model-name for {len(paths)} --model; give one per model or none")
        bad = next((n for n in names if not _SAFE_NAME.fullmatch(n) or n.startswith(".")), None)
        if bad is not None:
            raise DistillError(f"--model-name {bad!r} must be letters, digits, '.', '_' or '-' (it names a file)")
    else:
        parts = [Path(p).expanduser().resolve().parts if is_local_path(p) else tuple(p.strip("/").split("/"))
                 for p in paths]
        for depth in range(1, max(map(len, parts)) + 1):
            names = ["_".join(re.sub(r"[^A-Za-z0-9._-]+", "_", x) for x in pieces[-depth:]).strip("._") or "model"
                     for pieces in parts]
            if len(set(names)) == len(names):
                break
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise DistillError(f"two models would both be named {twice!r}: give each its own --model-name")
    return names


def perplexity(model, tokenizer, texts: list[str], batch_size: int, max_length: int, device) -> float:
    """exp(mean negative log-likelihood per token) of a causal LM over ``texts``, every token after the
    first of each text counted once (held-out text for a decoder-only student). The head is applied a
    chunk of rows at a time (``fused_head``): no logits of all tokens exist."""
    import math

    import torch
    import torch.nn.functional as F

    from distill.losses.fused_head import RowSum, Side, head_pass
    from distill.models.lm_head import head_of, trunk

    head = head_of(model)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, padding_side="right",
                            truncation=True, max_length=max_length).to(device)
            hidden, _ = trunk(model, **enc)
            # position i predicts token i + 1: the rows whose next token is real
            following = torch.zeros_like(enc["attention_mask"], dtype=torch.bool)
            following[:, :-1] = enc["attention_mask"][:, 1:].bool()
            rows = following.reshape(-1).nonzero().squeeze(1)
            targets = enc["input_ids"].roll(-1, dims=1).reshape(-1)[rows]
            hidden = head.prepare(hidden.reshape(-1, hidden.shape[-1])[rows])
            fn = RowSum(lambda s, t, r: F.cross_entropy(s, targets[r], reduction="none"))
            nll += float(head_pass(Side(hidden, head), None, [fn])[1][0])
            count += rows.numel()
    return math.exp(nll / max(count, 1))


def evaluate_models(models: dict[str, str], examples, load, out_dir, fingerprints: dict[str, dict],
                    synced: bool = False, samples: int = 1000, fresh: bool = False) -> dict:
    """Every model generates for the same examples; ROUGE, latency and throughput side by side.

    ``models``: name -> path (``model_names``); ``load(path) -> (model, tokenizer, device, settings)``;
    ``fingerprints``: name -> ``inference.fingerprint`` of its predictions. Predictions go to
    ``out_dir/<name>.jsonl``, every one claimed before the first model loads (a rerun continues only
    predictions of the same model, data and settings; ``fresh`` starts over), the figures to
    ``results.json`` and ``results.md``. Latency is generation time per example on one device (batched
    as the settings say); ``speedup`` is relative to the first model.
    """
    import gc
    import json

    import torch.distributed as dist

    from distill.infer.outputs import claim_output
    from distill.infer.generate import run_generation
    from distill.models.loading import rank_param_counts

    out_dir = Path(out_dir)
    for name in models:
        claim_output(out_dir / f"{name}.jsonl", fingerprints[name], fresh)
    references = [e.target for e in examples]
    rows: dict[str, dict] = {}
    for name, path in models.items():
        model, tokenizer, device, settings = load(path)
        records = run_generation(model, tokenizer, examples, settings, out_dir / f"{name}.jsonl", device,
                                 synced=synced, desc=name)
        seconds = sum(r["ms"] for r in records) / 1000
        tokens = sum(r["new_tokens"] for r in records)
        rows[name] = {**rouge([r["prediction"] for r in records], references, samples=samples),
                      "ms_per_example": 1000 * seconds / len(records), "tokens_per_sec": tokens / max(seconds, 1e-9),
                      "params_m": rank_param_counts(model)[1] / 1e6, "path": path}
        if not model.config.is_encoder_decoder:  # held-out text: each example's source and reference
            rows[name]["perplexity"] = perplexity(model, tokenizer, [e.source + " " + e.target for e in examples],
                                                  settings.batch_size, settings.max_source_length, device)
        del model
        gc.collect()
    first = next(iter(rows.values()))
    for row in rows.values():
        row["speedup"] = first["ms_per_example"] / max(row["ms_per_example"], 1e-9)
    columns = [*ROUGE_TYPES, "ms_per_example", "tokens_per_sec", "speedup", "params_m", "n"]
    if any("perplexity" in row for row in rows.values()):
        columns.append("perplexity")
    table = markdown_table(rows, columns)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / "results.json", json.dumps(rows, indent=2) + "\n")
        write_atomic(out_dir / "results.md", table)
    return {"models": rows, "table": table}
