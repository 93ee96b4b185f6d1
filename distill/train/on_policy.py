"""On-policy distillation (GKD, Agarwal et al. 2024): a share of the micro-batches trains on targets the
student samples itself, scored by the teacher, in place of the dataset's. The student then learns on
the sequences it actually produces when it generates alone, mistakes included.

Decoder-only rows are a prompt followed by a sampled response; encoder-decoder rows keep their source
and get a sampled summary as decoder target. Either way the new batch has the shape the collators
give, so the teacher, the student and every loss term take it unchanged; only the CE term is dropped
(its targets would be the student's own samples).
"""

from __future__ import annotations

import copy
import random
from typing import Any

import torch

from distill.data.collate import IGNORE_INDEX, shift_right, source_index, target_index


def is_on_policy(fraction: float, seed: int, step: int, micro: int) -> bool:
    """Whether a micro-batch is on-policy: drawn from (seed, step, micro-batch), so every rank draws the
    same and a resumed run draws as the uninterrupted one did."""
    if fraction <= 0:
        return False
    return random.Random(seed * 1_000_003 + step * 1_009 + micro).random() < fraction


def sampling_config(generation_config: Any, max_new_tokens: int, temperature: float, pad_token_id: int,
                    eos_token_id: int) -> Any:
    """The model's generation config turned to plain ancestral sampling: one sample from the student's
    own distribution at ``temperature``. Search and shaping settings a summarizer ships with (beams,
    top-k, minimum length, no-repeat n-grams) are switched off, since they would sample from another
    distribution; structural ones (decoder start, forced BOS/EOS, EOS) are kept."""
    config = copy.deepcopy(generation_config)
    config.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, typical_p=1.0, min_p=None,
                  num_beams=1, num_beam_groups=1, num_return_sequences=1, max_new_tokens=max_new_tokens,
                  max_length=None, min_length=0, min_new_tokens=None, no_repeat_ngram_size=0,
                  encoder_no_repeat_ngram_size=0, repetition_penalty=1.0, length_penalty=1.0, early_stopping=False,
                  pad_token_id=pad_token_id)
    if config.eos_token_id is None:
        config.eos_token_id = eos_token_id
    return config


def until_eos(row: list[int], eos: list[int]) -> list[int]:
    """A sampled sequence up to and including its first EOS token (ending is part of the answer; a model
    may have several EOS tokens); never empty."""
    end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
    return row[:end] or eos[:1]


def prompts_of(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each decoder-only row's prompt: its tokens up to the first one whose successor is a target."""
    prompts = []
    for i, (ids, labels) in enumerate(zip(batch["input_ids"], batch["labels"])):
        targets = (labels != IGNORE_INDEX).nonzero()
        end = int(targets[0]) + 1 if len(targets) else int(batch["attention_mask"][i].sum())
        prompts.append(ids[:end].tolist())
    return prompts


def causal_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """A ``CausalCollator``-style batch from prompts and responses: the labels cover the responses only,
    aligned with the logits (``labels[t]`` = the token at t+1); the row indices are built on the host."""
    rows = [p + r for p, r in zip(prompts, responses)]
    width = max(len(r) for r in rows)
    out = {"input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
           "position_ids": torch.arange(width).repeat(len(rows), 1),  # padding continues the count
           "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
           "weight": torch.ones(len(rows))}
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        out["input_ids"][i, :len(row)] = torch.tensor(row)
        out["attention_mask"][i, :len(row)] = 1
        out["labels"][i, len(prompt) - 1:len(row) - 1] = torch.tensor(row[len(prompt):], dtype=torch.long)
    return {**out, "target_index": target_index(out["labels"]), "source_index": source_index(out["attention_mask"])}


def seq2seq_targets(targets: list[list[int]], decoder_start_token_id: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Decoder labels, inputs and ``target_index`` for target token lists: what ``Seq2SeqCollator`` makes of
    target text."""
    labels = torch.full((len(targets), max(map(len, targets))), IGNORE_INDEX, dtype=torch.long)
    for i, target in enumerate(targets):
        labels[i, :len(target)] = torch.tensor(target, dtype=torch.long)
    return {"labels": labels, "decoder_input_ids": shift_right(labels, decoder_start_token_id, pad_id),
            "target_index": target_index(labels)}


@torch.no_grad()
def sample_batch(model: Any, batch: dict[str, torch.Tensor], sampling: Any, synced_gpus: bool) -> dict[str, torch.Tensor]:
    """``batch`` with its targets replaced by ones ``model`` samples under ``sampling`` (see
    ``sampling_config``). ``synced_gpus``: under ZeRO-3 every rank must run each forward, since each
    gathers parameters from all, so ranks that finish early keep stepping until the last one ends."""
    pad, eos = sampling.pad_token_id, sampling.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if model.config.is_encoder_decoder:
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             generation_config=sampling, synced_gpus=synced_gpus)
        targets = [until_eos(row, eos) for row in out[:, 1:].tolist()]  # after the decoder start token
        sampled = seq2seq_targets(targets, model.config.decoder_start_token_id, pad)
        return {**batch, **{k: v.to(batch["input_ids"].device) for k, v in sampled.items()}}
    prompts = prompts_of(batch)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=batch["input_ids"].device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=ids.device)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=sampling, synced_gpus=synced_gpus)
    responses = [until_eos(row, eos) for row in out[:, width:].tolist()]
    return {k: v.to(ids.device) for k, v in causal_batch(prompts, responses, pad).items()}
