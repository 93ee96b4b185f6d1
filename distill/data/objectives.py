"""Pre-training objectives on raw text (``data.objective``), applied on the fly by the collator.

Task-agnostic distillation runs the teacher's own pre-training objective on general text (Zhang et al.
2023, MiniEnD; Udagawa et al. 2023), and the same objectives pretrain a model with no teacher:

* ``mlm`` (Devlin et al. 2019): ``data.mask_rate`` (15%) of the tokens are predicted; of those 80%
  become the mask token, 10% a random token, 10% stay; optionally whole words at once;
* ``span_corruption`` (Raffel et al. 2020, T5): 15% of the tokens in spans of mean length 3, each span
  replaced by one sentinel ``<extra_id_N>`` in the input; the target lists each sentinel and its span;
* ``infilling`` (Lewis et al. 2020, BART): spans of Poisson(3) lengths (a 0-length span inserts a mask)
  until 30% of the tokens are masked, each span one mask token; the target is the original text;
* ``causal``: every next token.

The text is cut once, at load, into blocks of ``data.block_length`` tokens (documents joined by the
tokenizer's separator, EOS or SEP), each block one example. The corruption of a block is a pure function
of (``training.seed``, epoch, block id): the stream tags every row with its epoch (``EPOCH_KEY``), so a
resume, an elastic resume and any number of ranks or accumulation steps see the same corruption, and a
row's corruption never depends on the rows that share its micro-batch. Teacher and student read the
same batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from distill.config.settings import DataConfig, TextObjective
from distill.data.collate import EPOCH_KEY, IGNORE_INDEX, WEIGHT_KEY, shift_right, source_index, target_index
from distill.errors import DistillError

IDS, STARTS = "ids", "word_starts"  # a block's token ids; whole-word masking: where each word starts
BLOCK_KEY = "block"
DEFAULT_MASK_RATE = {"mlm": 0.15, "span_corruption": 0.15, "infilling": 0.30}
# the model kind each objective trains (distill.models.architectures' kinds)
OBJECTIVE_KIND = {"mlm": "encoder-only", "span_corruption": "encoder-decoder", "infilling": "encoder-decoder",
                  "causal": "decoder-only"}


def mask_rate(cfg: DataConfig) -> float:
    return DEFAULT_MASK_RATE.get(cfg.objective, 0.0) if cfg.mask_rate is None else cfg.mask_rate


def block_rng(seed: int, epoch: int, block: int) -> np.random.Generator:
    """The one source of randomness of a block's corruption."""
    return np.random.default_rng([seed, epoch, block])


# ---- blocks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Specials:
    """What a tokenizer puts around a text (BERT: [CLS] ... [SEP]; RoBERTa, BART: <s> ... </s>; T5: ... </s>;
    LLaMA: <s> ...), and what separates two documents inside a block (EOS or SEP)."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    separator: tuple[int, ...]

    @staticmethod
    def of(tokenizer) -> "Specials":
        plain = tokenizer("x", add_special_tokens=False)["input_ids"]
        full = tokenizer("x")["input_ids"]
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
        if at is None:  # pragma: no cover - a tokenizer whose template rewrites the text itself
            raise DistillError("cannot tell which special tokens the tokenizer adds around a text")
        prefix, suffix = tuple(full[:at]), tuple(full[at + len(plain):])
        end = suffix[-1:] or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
        return Specials(prefix, suffix, end)


def text_blocks(dataset, tokenizer, cfg: DataConfig, causal: bool = False):
    """The split's text (``cfg.source_column``) as a ``datasets.Dataset`` of blocks: column ``ids``, each block
    ``block_length`` tokens less the tokenizer's specials (the last one shorter), and with whole-word masking
    ``word_starts``. Documents follow each other, joined by the tokenizer's separator; empty rows are skipped.
    ``causal``: a decoder-only model's blocks, which end with no separator of their own."""
    import datasets

    specials = Specials.of(tokenizer)
    room = cfg.block_length - len(specials.prefix) - (0 if causal else len(specials.suffix))
    if room < 2:
        raise DistillError(f"data.block_length {cfg.block_length} leaves {room} tokens per block after the tokenizer's "
                           "special tokens; make it larger")
    # token ids as int32 arrays per document (a corpus of 100M tokens stays a few hundred MB)
    pieces: list[np.ndarray] = []
    starts: list[np.ndarray] = []
    separator = np.array(specials.separator, dtype=np.int32)
    texts = [t for t in dataset[cfg.source_column] if t and t.strip()]
    for first in range(0, len(texts), 1000):
        enc = tokenizer(texts[first:first + 1000], add_special_tokens=False)
        for i, ids in enumerate(enc["input_ids"]):
            if pieces:
                pieces.append(separator)
                starts.append(np.ones(len(separator), dtype=bool))
            pieces.append(np.asarray(ids, dtype=np.int32))
            if cfg.whole_word_masking:
                words = np.array([-1 if w is None else w for w in enc.word_ids(i)])
                starts.append(np.concatenate([[True], words[1:] != words[:-1]]) | (words < 0) if len(words) else
                              np.zeros(0, dtype=bool))
    if not pieces:
        raise DistillError(f"data.source_column '{cfg.source_column}' holds no text to cut into blocks")
    stream = np.concatenate(pieces)
    cuts = range(0, len(stream), room)
    columns: dict[str, Any] = {IDS: [stream[i:i + room] for i in cuts], BLOCK_KEY: list(range(len(cuts)))}
    if cfg.whole_word_masking:
        flags = np.concatenate(starts)
        columns[STARTS] = [flags[i:i + room] for i in cuts]
    return datasets.Dataset.from_dict(columns)


# ---- the corruptions: pure functions of a block and its generator ---------------------------------


def mlm_mask(ids: list[int], rng: np.random.Generator, rate: float, mask_id: int, random_ids: np.ndarray,
             word_starts: Optional[list[bool]] = None, protected: frozenset = frozenset()) -> tuple[list[int], list[int]]:
    """(input ids, labels): round(rate·n) of the n tokens not in ``protected`` (the separators between
    documents) predicted, at least one, chosen uniformly or, with ``word_starts``, as whole words until the
    count is reached; 80% of them become ``mask_id``, 10% a token drawn from ``random_ids``, 10% stay.
    Labels hold the original token at predicted positions, else IGNORE_INDEX."""
    eligible = [i for i, t in enumerate(ids) if t not in protected]
    n = len(ids)
    want = max(1, round(rate * len(eligible))) if eligible else 0
    if word_starts is None:
        chosen = rng.choice(np.array(eligible, dtype=np.int64), size=want, replace=False) if want else \
            np.array([], dtype=np.int64)
    else:
        bounds = [i for i, s in enumerate(word_starts) if s or i == 0] + [n]
        words = [r for r in (range(a, b) for a, b in zip(bounds, bounds[1:])) if ids[r[0]] not in protected]
        chosen_list: list[int] = []
        for w in rng.permutation(len(words)):
            if len(chosen_list) >= want:
                break
            chosen_list += words[w]
        chosen = np.array(chosen_list, dtype=np.int64)
    inputs, labels = list(ids), [IGNORE_INDEX] * n
    action = rng.random(len(chosen))
    replacement = rng.choice(random_ids, size=len(chosen))
    for pos, u, r in zip(chosen.tolist(), action.tolist(), replacement.tolist()):
        labels[pos] = ids[pos]
        inputs[pos] = mask_id if u < 0.8 else int(r) if u < 0.9 else ids[pos]
    return inputs, labels


def _composition(rng: np.random.Generator, total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` positive integers, uniformly among such splits."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else np.array([], int)
    return np.diff(np.concatenate([[0], cuts, [total]])).tolist()


def noise_spans(n: int, rng: np.random.Generator, rate: float, mean_span: float) -> list[tuple[int, int]]:
    """T5's span layout: round(rate·n) noise tokens (at least one, at most n − 1) in round(noise / mean_span)
    spans (at least one), noise and kept lengths each a uniform random split; the block starts with kept
    text. Returns the noise spans as (start, end)."""
    noise = min(max(1, round(rate * n)), n - 1)
    spans = max(1, min(round(noise / mean_span), noise, n - noise))
    noise_lengths, kept_lengths = _composition(rng, noise, spans), _composition(rng, n - noise, spans)
    out, at = [], 0
    for kept, length in zip(kept_lengths, noise_lengths):
        at += kept
        out.append((at, at + length))
        at += length
    return out


def span_corrupt(ids: list[int], rng: np.random.Generator, rate: float, mean_span: float,
                 sentinels: list[int]) -> tuple[list[int], list[int]]:
    """(input, target) of T5's span corruption: each noise span is one sentinel in the input, and the target
    is each sentinel followed by the span it replaced (the caller adds EOS to both)."""
    spans = noise_spans(len(ids), rng, rate, mean_span)
    if len(spans) > len(sentinels):
        raise DistillError(f"a block needs {len(spans)} sentinels and the tokenizer has {len(sentinels)}: shorten "
                           "data.block_length or add sentinels (distill train-tokenizer --sentinels)")
    inputs, target, at = [], [], 0
    for sentinel, (start, end) in zip(sentinels, spans):
        inputs += ids[at:start] + [sentinel]
        target += [sentinel] + ids[start:end]
        at = end
    return inputs + ids[at:], target


def infill(ids: list[int], rng: np.random.Generator, rate: float, poisson_mean: float, mask_id: int) -> list[int]:
    """BART's text infilling: span lengths drawn from Poisson(``poisson_mean``) until round(rate·n) tokens are
    covered (the last span cut to fit), each span replaced by one ``mask_id`` (a 0-length span inserts one);
    spans are placed at random, kept text between them, in order."""
    n = len(ids)
    budget = round(rate * n)
    lengths: list[int] = []
    while sum(lengths) < budget:
        lengths.append(int(min(rng.poisson(poisson_mean), budget - sum(lengths))))
    while len(lengths) > budget:  # 0-length spans past the budget: the input never outgrows the block
        lengths.remove(0)
    if not lengths:
        return list(ids)
    kept = n - budget
    # the kept tokens around and between the spans: one at least between two spans, so they stay apart
    gaps = [0] + [1] * (len(lengths) - 1) + [0]
    spare = kept - (len(lengths) - 1)
    if spare < 0:  # more spans than kept tokens to separate them: merge the surplus into the last span
        lengths = lengths[:kept + 1]
        lengths[-1] += budget - sum(lengths)
        gaps, spare = [0] + [1] * (len(lengths) - 1) + [0], kept - (len(lengths) - 1)
    for g in rng.integers(0, len(gaps), size=spare).tolist():
        gaps[g] += 1
    out, at = [], 0
    for gap, length in zip(gaps, lengths):
        out += ids[at:at + gap] + [mask_id]
        at += gap + length
    return out + ids[at:]


# ---- the collator ---------------------------------------------------------------------------------


@dataclass
class TextObjectiveCollator:
    """Blocks (``text_blocks``) to a corrupted batch for ``cfg.objective``, each block's corruption drawn from
    ``block_rng(seed, epoch, block id)``. Batch keys: the ``Seq2SeqCollator``'s for span corruption and
    infilling, the ``CausalCollator``'s for causal; for mlm ``input_ids``, ``attention_mask``, ``labels`` (the
    original token at predicted positions, aligned with the logits at the same position), ``target_index``,
    ``source_index`` and ``weight``."""

    tokenizer: Any
    cfg: DataConfig
    seed: int
    decoder_start_token_id: Optional[int] = None
    specials: Specials = field(init=False)

    def __post_init__(self) -> None:
        tok, objective = self.tokenizer, self.cfg.objective
        self.specials = Specials.of(tok)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.pad is None:
            raise DistillError("the tokenizer has neither a pad nor an EOS token to pad batches with")
        self.rate = mask_rate(self.cfg)
        if objective in ("mlm", "infilling") and tok.mask_token_id is None:
            raise DistillError(f"data.objective={objective} needs a mask token, and the tokenizer has none")
        special = set(tok.all_special_ids)
        self.protected = frozenset(special)
        self.random_ids = np.array([i for i in range(len(tok)) if i not in special], dtype=np.int64)
        if objective == "span_corruption":
            self.sentinels = [i for i in tok.convert_tokens_to_ids([f"<extra_id_{k}>" for k in range(1000)])
                              if i is not None and i != tok.unk_token_id]
            if not self.sentinels:
                raise DistillError("data.objective=span_corruption needs T5's sentinel tokens <extra_id_0>, ... in the "
                                   "tokenizer (distill train-tokenizer --sentinels 100 adds them)")
        if objective in ("span_corruption", "infilling") and self.decoder_start_token_id is None:
            raise DistillError(f"data.objective={objective} trains an encoder-decoder model: the model config has no "
                               "decoder_start_token_id")

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.collate_targets(rows)[0]

    def collate_targets(self, rows: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
        """The batch, and each example's target ids in order."""
        pairs = [self._corrupt(r) for r in rows]
        weights = torch.tensor([float(r.get(WEIGHT_KEY, 1.0)) for r in rows])
        if self.cfg.objective == "causal":
            return self._causal([p for p, _ in pairs], weights)
        inputs = _pad([p for p, _ in pairs], self.pad)
        labels = _pad([t for _, t in pairs], IGNORE_INDEX)
        batch = {"input_ids": inputs, "attention_mask": (_pad([[1] * len(p) for p, _ in pairs], 0)), "labels": labels,
                 "weight": weights}
        if self.cfg.objective != "mlm":
            batch["decoder_input_ids"] = shift_right(labels, self.decoder_start_token_id, self.pad)
        batch["target_index"], batch["source_index"] = target_index(labels), source_index(batch["attention_mask"])
        return batch, [[i for i in t if i != IGNORE_INDEX] for _, t in pairs]

    def _corrupt(self, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        """(input ids, label ids) of one block with the tokenizer's specials; mlm labels align with the input."""
        s, objective = self.specials, self.cfg.objective
        ids = list(row[IDS])
        rng = block_rng(self.seed, int(row.get(EPOCH_KEY, 0)), int(row[BLOCK_KEY]))
        wrap = lambda x: list(s.prefix) + x + list(s.suffix)  # noqa: E731
        if objective == "mlm":
            inputs, labels = mlm_mask(ids, rng, self.rate, self.tokenizer.mask_token_id, self.random_ids,
                                      row.get(STARTS), self.protected)
            return wrap(inputs), [IGNORE_INDEX] * len(s.prefix) + labels + [IGNORE_INDEX] * len(s.suffix)
        if objective == "span_corruption":
            inputs, target = span_corrupt(ids, rng, self.rate, self.cfg.mean_span_length, self.sentinels)
            return wrap(inputs), target + list(s.suffix)
        if objective == "infilling":
            return wrap(infill(ids, rng, self.rate, self.cfg.mean_span_length, self.tokenizer.mask_token_id)), wrap(ids)
        return list(s.prefix) + ids, []

    def _causal(self, sequences: list[list[int]], weights: torch.Tensor):
        input_ids = _pad(sequences, self.pad)
        mask = _pad([[1] * len(x) for x in sequences], 0)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, :-1] = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)  # position t predicts t + 1
        width = input_ids.shape[1]
        batch = {"input_ids": input_ids, "attention_mask": mask,
                 "position_ids": torch.arange(width).expand(len(sequences), width).clone(), "labels": labels,
                 "weight": weights, "target_index": target_index(labels), "source_index": source_index(mask)}
        return batch, [x[1:] for x in sequences]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(1, max(len(r) for r in rows))), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def check_objective(objective: Optional[TextObjective], kind: str, role: str) -> None:
    """A text objective trains one kind of model: refused before anything loads otherwise."""
    if objective is not None and OBJECTIVE_KIND[objective] != kind:
        raise DistillError(f"data.objective={objective} trains {OBJECTIVE_KIND[objective]} models, and the {role} is "
                           f"{kind}")
