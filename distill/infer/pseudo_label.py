"""Pseudo-labels (Shleifer & Rush's PL): the teacher's generations become the training targets.

The output directory is a dataset the PL recipes train on: ``train.jsonl`` holds each source with the
teacher's summary in the target column (the gold one kept beside it as ``gold_<target>`` with the
pseudo-label's ROUGE-2 against it), and the evaluation split is copied with its gold targets, so the
student is still judged against references. Generation is resumable (``distill.infer.generate``); the
dataset files are written only once every example has its label; a rerun continues labels of the same
teacher, data and settings only (``fresh`` starts over).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from distill.errors import DistillError
from distill.files import write_atomic
from distill.infer.generate import read_examples, run_generation
from distill.infer.inputs import Example
from distill.infer.outputs import claim_output, data_origin, fingerprint

WORK = ".pseudo_label"  # hidden: datasets ignores it when it loads the directory


def build_rows(examples: list[Example], predictions: list[dict], source_column: str, target_column: str,
               min_rouge2: Optional[float], below: str) -> tuple[list[dict], dict]:
    """Dataset rows and a summary. ``below``: what an example whose label scores under ``min_rouge2``
    against gold becomes: "gold" (trained on its gold summary) or "drop"."""
    from distill.infer.evaluate import rouge_scores

    if below not in ("gold", "drop"):
        raise DistillError(f"--below must be 'gold' or 'drop', got {below!r}")
    has_gold = all(e.target is not None for e in examples)
    if min_rouge2 is not None and not has_gold:
        raise DistillError(f"--min-rouge2 needs gold targets: the data has no column '{target_column}'")
    r2 = ([s["rouge2"] for s in rouge_scores([p["prediction"] for p in predictions], [e.target for e in examples])]
          if has_gold else [None] * len(examples))
    rows, kept, replaced, dropped = [], 0, 0, 0
    for example, pred, score in zip(examples, predictions, r2):
        row = {source_column: example.source, target_column: pred["prediction"]}
        if has_gold:
            row[f"gold_{target_column}"] = example.target
            row["pseudo_rouge2"] = score
        if min_rouge2 is not None and score < min_rouge2:
            if below == "drop":
                dropped += 1
                continue
            row[target_column] = example.target
            replaced += 1
        else:
            kept += 1
        rows.append(row)
    if not rows:
        raise DistillError(f"every pseudo-label scored under --min-rouge2 {min_rouge2}: nothing left to train on")
    summary = {"examples": len(examples), "pseudo_labels": kept, "gold_fallback": replaced, "dropped": dropped}
    if has_gold:
        summary["mean_rouge2"] = sum(r2) / len(r2)
    return rows, summary


def pseudo_label(load, location: str, settings, data: str, out: Path, split: str, source_column: str,
                 target_column: str, name: Optional[str] = None, eval_split: Optional[str] = "validation",
                 max_samples: Optional[int] = None, min_rouge2: Optional[float] = None, below: str = "gold",
                 synced: bool = False, fresh: bool = False) -> dict:
    """Label ``split`` of ``data`` with the teacher at ``location``; ``load() -> (model, tokenizer, device)``
    is called only once the data is read and the output claimed."""
    out = Path(out)
    examples = read_examples(data, split, source_column, target_column, name, max_samples)
    # Read the evaluation split first: a bad split name fails before hours of generation.
    eval_examples = read_examples(data, eval_split, source_column, target_column, name) if eval_split else None
    work = out / WORK / f"{split}.jsonl"
    claim_output(work, fingerprint(location, settings, examples,
                                   data_origin(data, split, source_column, target_column, name)), fresh)
    model, tokenizer, device = load()
    predictions = run_generation(model, tokenizer, examples, settings, work, device, synced=synced,
                                 desc="pseudo-label")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rows, summary = build_rows(examples, predictions, source_column, target_column, min_rouge2, below)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        if eval_examples is not None:
            write_atomic(out / "validation.jsonl", "".join(
                json.dumps({source_column: e.source, target_column: e.target}) + "\n" for e in eval_examples))
        summary.update({"source": data, "split": split, "min_rouge2": min_rouge2, "below": below})
        write_atomic(out / "pseudo_label.json", json.dumps(summary, indent=2) + "\n")
    return summary
