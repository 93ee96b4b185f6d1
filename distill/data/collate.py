"""Collators: rows of text to padded model batches, for encoder-decoder and decoder-only models.

Tokenizing in the collator (rather than a ``map`` pass over the whole corpus) costs nothing up front,
needs no cache shared between ranks, and keeps padding dynamic: each micro-batch is padded to its
own longest example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from distill.config.settings import DataConfig
from distill.errors import DistillError

IGNORE_INDEX = -100

WEIGHT_KEY = "__weight__"
EPOCH_KEY = "__epoch__"  # the epoch a training row is read in (pre-training objectives draw from it)


def shift_right(labels: torch.Tensor, decoder_start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Decoder inputs from labels: start token first, labels shifted by one, ignored positions as padding."""
    out = labels.new_full(labels.shape, pad_token_id)
    out[:, 0] = decoder_start_token_id
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill_(out == IGNORE_INDEX, pad_token_id)


def target_index(labels: torch.Tensor) -> torch.Tensor:
    """The flat indices into ``labels.view(-1)`` of the targets (labels not IGNORE_INDEX), ascending.

    Collators compute them on the host, so the losses gather target rows with an index the device
    already has, instead of boolean indexing or ``nonzero``, which wait for the device to count them.
    """
    return torch.nonzero(labels.reshape(-1) != IGNORE_INDEX).view(-1)


def source_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """The flat indices into ``attention_mask.view(-1)`` of the real tokens (mask 1), ascending; the
    host-side counterpart of ``target_index`` for the input side."""
    return torch.nonzero(attention_mask.reshape(-1) == 1).view(-1)


@dataclass
class Seq2SeqCollator:
    """Rows of text to a padded batch: input ids, attention mask, labels, decoder inputs, the row weights
    and the host-side ``target_index`` / ``source_index``."""

    tokenizer: Any
    cfg: DataConfig
    decoder_start_token_id: int
    pad_to_multiple_of: Optional[int] = None

    def __post_init__(self) -> None:
        if self.cfg.target_column is None:
            raise DistillError("data.target_column is null (plain text), which only decoder-only models can train on")

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.collate_targets(rows)[0]

    def collate_targets(self, rows: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
        """The batch, and each example's target ids in order (their concatenation is the target rows)."""
        tok, cfg = self.tokenizer, self.cfg
        enc = tok([cfg.source_prefix + r[cfg.source_column] for r in rows], max_length=cfg.max_source_length,
                  truncation=True, padding="longest", pad_to_multiple_of=self.pad_to_multiple_of,
                  return_tensors="pt")
        tgt = tok(text_target=[r[cfg.target_column] for r in rows], max_length=cfg.max_target_length,
                  truncation=True, padding="longest", pad_to_multiple_of=self.pad_to_multiple_of,
                  return_tensors="pt")
        labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, IGNORE_INDEX)
        targets = [[i for i in row if i != IGNORE_INDEX] for row in labels.tolist()]
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": labels,
            "decoder_input_ids": shift_right(labels, self.decoder_start_token_id, tok.pad_token_id),
            "target_index": target_index(labels),
            "source_index": source_index(enc["attention_mask"]),
            # Padding rows added to even out evaluation shards across ranks weigh nothing.
            "weight": torch.tensor([float(r.get(WEIGHT_KEY, 1.0)) for r in rows]),
        }, targets


@dataclass
class CausalCollator:
    """Rows of text to a padded batch for a decoder-only model: each example is one sequence (prompt
    then response, or plain text with ``data.target_column`` null), right-padded, optionally several
    examples to a row (``data.packing``).

    Keys: ``input_ids``, ``attention_mask`` (1 on real tokens), ``position_ids`` (0, 1, ... from the
    start of each example; padding continues the count of the example before it), ``labels``,
    ``weight`` (B,), ``target_index`` and ``source_index`` (every real token). Labels are aligned with the logits, not with the inputs: ``labels[:, t]`` is the
    token at t+1 when that token is a target, else IGNORE_INDEX, so the losses take logits and labels
    as they are, ``labels != IGNORE_INDEX`` is the distillation mask, and no label crosses from one
    packed example into the next. Targets are the response with what ends it (EOS, or the chat
    template's end marker); every token with ``data.loss_on_prompt`` or for plain text.

    A prompt is cut to ``max_source_length`` tokens from its end (the part next to the response
    matters; a leading BOS stays), a response to ``max_target_length`` from its start, plain text to
    their sum from its start. Give the model ``causal_model_inputs(batch, cfg.packing)``, not the batch.
    """

    tokenizer: Any
    cfg: DataConfig
    pack_length: Optional[int] = None  # tokens per packed row; default max_source_length + max_target_length

    def __post_init__(self) -> None:
        tok, cfg = self.tokenizer, self.cfg
        if self.pack_length is None:
            self.pack_length = cfg.max_source_length + cfg.max_target_length
        if self.pack_length < 1:
            raise DistillError(f"pack_length must be >= 1, got {self.pack_length}")
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.pad_id is None:
            raise DistillError("the tokenizer has neither a pad nor an EOS token to pad batches with")
        self.use_template = bool(cfg.chat_template and getattr(tok, "chat_template", None)) and \
            cfg.target_column is not None
        if not self.use_template and tok.eos_token_id is None:
            raise DistillError("the tokenizer has no EOS token to end responses and texts with")
        # The tokenizer's own BOS convention: LLaMA adds one, Qwen none.
        bos = tok.bos_token_id
        self.bos = [bos] if bos is not None and tok("")["input_ids"][:1] == [bos] else []

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _chat(self, prompts: list[str], responses: list[str]) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, response ids) from the chat template: the response is what the conversation
        adds to the prompt rendered with its generation prompt (the template writes any BOS itself)."""
        tok = self.tokenizer
        fulls = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                         tokenize=False) for p, r in zip(prompts, responses)]
        heads = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        pairs = []
        for full, head, full_ids, head_ids in zip(fulls, heads, self._tokenize(fulls), self._tokenize(heads)):
            if full_ids[:len(head_ids)] == head_ids:
                pairs.append((head_ids, full_ids[len(head_ids):]))
            elif full.startswith(head):  # a token merged across the boundary: split the text instead
                pairs.append((head_ids, self._tokenize([full[len(head):]])[0]))
            else:
                raise DistillError("the tokenizer's chat template does not render the prompt as the start of the "
                                   "conversation; set data.chat_template: false")
        return pairs

    def _keep_end(self, ids: list[int], limit: int) -> list[int]:
        if len(ids) <= limit:
            return ids
        keep = 1 if limit > 1 and ids[0] == self.tokenizer.bos_token_id else 0
        return ids[:keep] + ids[len(ids) - (limit - keep):]

    def encode(self, row: dict[str, Any]) -> tuple[list[int], list[bool]]:
        """One example's token ids and, per token, whether it is a target."""
        return self._encode([row])[0]

    def _encode(self, rows: list[dict[str, Any]]) -> list[tuple[list[int], list[bool]]]:
        tok, cfg = self.tokenizer, self.cfg
        prompts = [cfg.source_prefix + r[cfg.source_column] for r in rows]
        if cfg.target_column is None:
            limit = cfg.max_source_length + cfg.max_target_length
            texts = [(self.bos + ids + [tok.eos_token_id])[:limit] for ids in self._tokenize(prompts)]
            return [(ids, [True] * len(ids)) for ids in texts]
        responses = [r[cfg.target_column] for r in rows]
        if self.use_template:
            pairs = self._chat(prompts, responses)
        else:
            pairs = [(self.bos + p, r + [tok.eos_token_id])
                     for p, r in zip(self._tokenize(prompts), self._tokenize(responses))]
        out = []
        for prompt, response in pairs:
            prompt, response = self._keep_end(prompt, cfg.max_source_length), response[:cfg.max_target_length]
            out.append((prompt + response, [cfg.loss_on_prompt] * len(prompt) + [True] * len(response)))
        return out

    def _pack(self, lengths: list[int], weights: list[float]) -> list[list[int]]:
        """Greedy, in order: an example joins the current row while it fits and weighs the same (a row has
        one weight); one longer than a row gets a row of its own."""
        rows: list[list[int]] = []
        size = 0
        for i, n in enumerate(lengths):
            if rows and size + n <= self.pack_length and weights[rows[-1][0]] == weights[i]:
                rows[-1].append(i)
                size += n
            else:
                rows.append([i])
                size = n
        return rows

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.collate_targets(rows)[0]

    def collate_targets(self, rows: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
        """The batch, and each example's target ids in order (packing keeps the examples' order, so their
        concatenation is the batch's target rows)."""
        examples = self._encode(rows)
        # Padding rows added to even out evaluation shards across ranks weigh nothing.
        weights = [float(r.get(WEIGHT_KEY, 1.0)) for r in rows]
        groups = (self._pack([len(ids) for ids, _ in examples], weights) if self.cfg.packing
                  else [[i] for i in range(len(rows))])
        width = max(1, max(sum(len(examples[i][0]) for i in g) for g in groups))
        input_ids = torch.full((len(groups), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(groups), width), dtype=torch.long)
        position_ids = torch.zeros((len(groups), width), dtype=torch.long)
        labels = torch.full((len(groups), width), IGNORE_INDEX, dtype=torch.long)
        for b, group in enumerate(groups):
            start = 0
            for i in group:
                ids, targets = torch.tensor(examples[i][0], dtype=torch.long), torch.tensor(examples[i][1])
                n = len(ids)
                input_ids[b, start:start + n] = ids
                attention_mask[b, start:start + n] = 1
                position_ids[b, start:start + n] = torch.arange(n)
                # Logits at t predict token t+1; an example's last position predicts nothing of its own.
                labels[b, start:start + n - 1] = torch.where(targets[1:], ids[1:], IGNORE_INDEX)
                start += n
            position_ids[b, start:] = torch.arange(width - start) + (position_ids[b, start - 1] + 1 if start else 0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "labels": labels,
            "weight": torch.tensor([weights[g[0]] for g in groups]),
            "target_index": target_index(labels),
            "source_index": source_index(attention_mask),
        }, [[i for i, t in zip(ids[1:], targets[1:]) if t] for ids, targets in examples]


def causal_model_inputs(batch: dict[str, torch.Tensor], packed: bool) -> dict[str, Any]:
    """The keyword arguments a decoder-only model's forward gets for a ``CausalCollator`` batch:
    ``input_ids``, ``position_ids``, ``attention_mask`` (the 2-D padding mask, or None when ``packed``:
    ``data.packing`` is on) and ``use_cache=False`` (so a caller must not pass ``use_cache`` again).

    Why None and no cache: transformers 5 keeps packed examples apart only through its own detection
    (``masking_utils._preprocess_mask_arguments``): when the 2-D mask is None *and* there is no cache,
    it reads sequence boundaries from where ``position_ids`` restart (``find_packed_sequence_indices``)
    and builds a block-causal mask. A 2-D mask, or the empty cache a model creates for the config's
    default ``use_cache=True``, turns that off and every token of a row would see the examples before
    it. Padding needs no mask in packed rows: it only follows real tokens, which cannot see it. So None
    is right for every batch of a packing run, whether or not a row of it holds two examples, and the
    flag comes from the config rather than from the batch (which would cost a device sync per forward).
    """
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "attention_mask": None if packed else batch["attention_mask"], "use_cache": False}
