"""Teacher and student with different tokenizers: what each token's text is, which tokens the two
vocabularies share, and which target tokens of one example cover the same text (aligned spans).

Both models read the same row, each through its own collator (its template, special tokens and
truncation). A token's text comes from its vocabulary entry, decoded the way its tokenizer decodes:
byte-level BPE pieces (GPT-2, LLaMA-3, Qwen) map back through the byte table, SentencePiece pieces turn
``▁`` into a space and ``<0xNN>`` byte fallback into that byte. That is exact for the ids in the batch,
whatever text the tokenizer was called on (a whole chat conversation, ``text_target`` with special
tokens), and a character split over several byte tokens is covered by all of them.

Spans. Each side's target tokens advance a position in the target text counted in bytes that are not
whitespace, so the two sides agree whatever their conventions for spaces (a dummy prefix, ``Ġ`` or
``▁``, a template's newline). A span ends where both sides have a token ending at the same position;
each side's tokens up to it form the span (1:1 for a shared token, 1:3 or 3:1 where one tokenizer
splits a word the other keeps). Text past the first byte where the sides disagree (an unknown token,
different normalization) or past one side's truncation is left out, as are special tokens, except the
last one of each side (EOS, or the chat template's end marker) when both texts were covered whole: it
is the decision to stop, and the two are compared as a 1:1 span. Left-out tokens keep their CE.

MinED vocabulary map (``loss.cross_tokenizer=mined``; Wan et al. 2024, FuseLLM). Every teacher token goes
to the student token whose text is nearest by edit distance over bytes (its own text when the student
holds it; a special token to the student's of the same role), so the teacher's whole distribution can
be read on the student's vocabulary. Ties go to the longer common prefix, then the lower id.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from distill.errors import DistillError
from distill.losses.cross_tokenizer import TEACHER_PREFIX

# the span tensors a cross-tokenizer batch adds (indices into the micro-batch's target rows, in order)
SPAN_KEYS = ("span_first", "span_rest", "span_rest_of", "span_exact")
MAPPED_KEY = "span_mapped"  # with a MinED map: 1 where the teacher's first token maps to the student's
_CELLS = 1 << 22  # cells of one block of the edit-distance table (8 MiB of int16)
_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")
_SPECIAL_ROLES = ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id")


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable character table (GPT-2's ``bytes_to_unicode``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_types(tokenizer: Any) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                found.add(node["type"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(backend.to_str()).get("decoder"))
    return found


def token_bytes(tokenizer: Any) -> list[Optional[bytes]]:
    """Every id's text as bytes; None for special tokens (they have no text)."""
    n = len(tokenizer)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    kinds = _decoder_types(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    byte_level = _byte_decoder() if "ByteLevel" in kinds else None
    out: list[Optional[bytes]] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(None)
        elif i in added:
            out.append(added[i].encode())
        elif byte_level is not None:
            out.append(bytes(byte_level[c] for c in piece) if all(c in byte_level for c in piece) else piece.encode())
        elif kinds:
            if "ByteFallback" in kinds and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out.append(bytes([int(piece[3:5], 16)]))
            elif "WordPiece" in kinds:
                out.append(piece[2:].encode() if piece.startswith("##") else b" " + piece.encode())
            else:  # Metaspace, or Replace("▁", " ")
                out.append(piece.replace("▁", " ").encode())
        else:  # a tokenizer without a fast backend: ask it
            out.append(tokenizer.decode([i]).encode())
    return out


@dataclass
class SharedVocab:
    """The two tokenizers' token texts and the tokens they share (same bytes, or the same special role)."""

    student: list[Optional[bytes]]
    teacher: list[Optional[bytes]]
    student_ids: torch.Tensor = field(init=False)  # (M,) shared tokens, student ids
    teacher_ids: torch.Tensor = field(init=False)  # (M,) the same tokens, teacher ids
    to_teacher: dict[int, int] = field(init=False)
    # with ``mined``: per teacher id, its MinED student id (-1: a special token with no counterpart, or
    # past the teacher's vocab_size)
    to_student: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, student_tok: Any, teacher_tok: Any, student_vocab: int, teacher_vocab: int,
           mined: bool = False) -> "SharedVocab":
        """From the two tokenizers; ids past a model's ``vocab_size`` (rows it cannot produce) are left out.
        ``mined``: also the MinED map (``loss.cross_tokenizer=mined``)."""
        shared = cls(token_bytes(student_tok), token_bytes(teacher_tok))
        pairs: dict[int, int] = {}
        used: set[int] = set()  # one-to-one: a text held by several ids pairs its first ones

        def pair(s: int, t: int) -> None:
            if s not in pairs and t not in used:
                pairs[s] = t
                used.add(t)

        first_t: dict[bytes, int] = {}
        for i, text in enumerate(shared.teacher[:teacher_vocab]):
            if text is not None:
                first_t.setdefault(text, i)
        for i, text in enumerate(shared.student[:student_vocab]):
            if text is not None and text in first_t:
                pair(i, first_t[text])
        for role in _SPECIAL_ROLES:
            s, t = getattr(student_tok, role, None), getattr(teacher_tok, role, None)
            if s is not None and t is not None and s < student_vocab and t < teacher_vocab:
                pair(s, t)
        shared.to_teacher = pairs
        ids = sorted(pairs.items())
        shared.student_ids = torch.tensor([s for s, _ in ids], dtype=torch.long)
        shared.teacher_ids = torch.tensor([t for _, t in ids], dtype=torch.long)
        if mined:
            shared.to_student = mined_map(shared.student[:student_vocab], shared.teacher[:teacher_vocab], pairs)
        return shared

    def mined_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(student ids, teacher ids) of every mapped teacher token: the teacher's distribution read on the
        student's vocabulary is ``index_add`` of its probabilities at the teacher ids into the student ids."""
        teacher_ids = (self.to_student >= 0).nonzero().squeeze(1)
        return self.to_student[teacher_ids], teacher_ids


def edit_distances(texts: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(T, K) Levenshtein distances between T byte strings of one length (T, m) and K of another (K, n), uint8.
    Row by row of the table: substitution and deletion elementwise, then the run of insertions along the
    row as a running minimum of D[j] − j."""
    steps = np.arange(candidates.shape[1] + 1, dtype=np.int16)  # int16: a quarter of int64's memory traffic
    prev = np.broadcast_to(steps, (texts.shape[0], candidates.shape[0], steps.size))
    for i in range(texts.shape[1]):
        step = np.minimum(prev[..., :-1] + (candidates[None] != texts[:, i, None, None]), prev[..., 1:] + 1)
        row = np.concatenate([np.full(step.shape[:2] + (1,), i + 1, dtype=np.int16), step], axis=-1)
        prev = np.minimum.accumulate(row - steps, axis=-1) + steps
    return prev[..., -1]


def _by_length(texts: dict[int, bytes]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{length: (ids ascending, their bytes as a (K, length) uint8 array)}."""
    groups: dict[int, list[int]] = {}
    for i, text in texts.items():
        groups.setdefault(len(text), []).append(i)
    return {n: (np.array(ids), np.frombuffer(b"".join(texts[i] for i in ids), np.uint8).reshape(len(ids), n))
            for n, ids in sorted(groups.items())}


def mined_map(student: list[Optional[bytes]], teacher: list[Optional[bytes]],
              specials: dict[int, int]) -> torch.Tensor:
    """Per teacher id, the student id of minimum edit distance between the two texts (module docstring);
    ``specials``: student id -> teacher id of tokens paired already (same text, or the same special role).
    A teacher special with no counterpart gets -1."""
    out = np.full(len(teacher), -1, dtype=np.int64)
    for s, t in specials.items():
        out[t] = s
    own = {text: i for i, text in reversed(list(enumerate(student))) if text is not None}
    left: dict[int, bytes] = {}
    for i, text in enumerate(teacher):
        if out[i] < 0 and text is not None:
            if text in own:
                out[i] = own[text]
            else:
                left[i] = text
    buckets = _by_length({i: t for i, t in enumerate(student) if t is not None})
    for m, (t_ids, t_bytes) in _by_length(left).items():
        # best (distance, −common prefix, id) so far per teacher token; distance >= |m − n| prunes lengths
        best = np.full((len(t_ids), 3), np.iinfo(np.int64).max)
        for n, (s_ids, s_bytes) in sorted(buckets.items(), key=lambda kv: abs(kv[0] - m)):
            if abs(n - m) > best[:, 0].max():
                break
            block = max(1, _CELLS // (len(s_ids) * (n + 1)))
            for a in range(0, len(t_ids), block):
                rows = slice(a, a + block)
                dist = edit_distances(t_bytes[rows], s_bytes)
                k = min(m, n)
                prefix = np.cumprod(t_bytes[rows, None, :k] == s_bytes[None, :, :k], axis=-1).sum(-1)
                key = dist.astype(np.int64) * (k + 1) - prefix  # argmin: least distance, longest prefix, id
                j = key.argmin(1)
                cand = np.stack([dist[np.arange(len(j)), j], -prefix[np.arange(len(j)), j], s_ids[j]], 1)
                better = [tuple(c) < tuple(b) for c, b in zip(cand, best[rows])]
                best[rows] = np.where(np.array(better)[:, None], cand, best[rows])
        out[t_ids] = best[:, 2]
    return torch.from_numpy(out)


@dataclass
class Spans:
    """One example's alignment: per span, its student and teacher target positions (0-based within the
    example's targets), and whether it is one shared token on both sides."""

    student: list[list[int]]
    teacher: list[list[int]]
    exact: list[bool]


def _positions(ids: Sequence[int], table: list[Optional[bytes]]) -> tuple[list[Optional[int]], bytes]:
    """Per token, the count of non-whitespace text bytes up to its end (None: a special token), and the
    non-whitespace text."""
    ends: list[Optional[int]] = []
    text = bytearray()
    for i in ids:
        piece = table[i] if 0 <= i < len(table) else None
        if piece is None:
            ends.append(None)
            continue
        text += bytes(b for b in piece if b not in _WHITESPACE)
        ends.append(len(text))
    return ends, bytes(text)


def _last_special(ends: list[Optional[int]]) -> Optional[int]:
    """The position of the last special token when only whitespace follows it."""
    start = [0] * len(ends)  # the text position before each token
    for k in range(1, len(ends)):
        start[k] = ends[k - 1] if ends[k - 1] is not None else start[k - 1]
    for k in range(len(ends) - 1, -1, -1):
        if ends[k] is None:
            return k
        if ends[k] > start[k]:
            return None
    return None


def align(student_ids: Sequence[int], teacher_ids: Sequence[int], vocab: SharedVocab) -> Spans:
    """The aligned spans of one example's target tokens (see the module docstring)."""
    s_ends, s_text = _positions(student_ids, vocab.student)
    t_ends, t_text = _positions(teacher_ids, vocab.teacher)
    agree = len(os.path.commonprefix([s_text, t_text]))
    bounds = sorted({e for e in s_ends if e is not None and 0 < e <= agree} &
                    {e for e in t_ends if e is not None and 0 < e <= agree})
    s_end, t_end = _last_special(s_ends), _last_special(t_ends)
    spans_s: list[list[int]] = [[] for _ in bounds]
    spans_t: list[list[int]] = [[] for _ in bounds]
    for ends, stop, spans in ((s_ends, s_end, spans_s), (t_ends, t_end, spans_t)):
        j = 0
        for k, e in enumerate(ends[:stop]):
            if e is None:
                continue
            while j < len(bounds) and bounds[j] < e:
                j += 1
            if j == len(bounds):
                break
            spans[j].append(k)
    whole = len(s_text) == len(t_text) == agree
    if whole and s_end is not None and t_end is not None:
        spans_s.append([s_end])
        spans_t.append([t_end])
    exact = [len(s) == 1 and len(t) == 1 and vocab.to_teacher.get(student_ids[s[0]]) == teacher_ids[t[0]]
             for s, t in zip(spans_s, spans_t)]
    return Spans(spans_s, spans_t, exact)


@dataclass
class CrossTokenizerCollator:
    """Rows to a student batch, the teacher's own batch of the same rows (keys prefixed ``TEACHER_PREFIX``)
    and the spans of every example, as indices into the micro-batch's target rows (``SPAN_KEYS``):

    * ``span_first`` (S,): each span's first student target row; ``teacher.span_first``: the teacher's;
    * ``span_rest`` / ``span_rest_of`` (R,): the span's other student rows and the span each belongs to
      (the teacher's likewise);
    * ``span_exact`` (S,) float: 1 where the span is one token the vocabularies share, else 0;
    * with a MinED map (``SharedVocab.to_student``), ``span_mapped`` (S,) float: 1 where the teacher's first
      token of the span maps to the student's first token, else 0.

    Computed on the host, from the rows alone: packing, any number of ranks and resume need nothing more.
    ``one_to_one``: feature terms compare positions, so a batch the two tokenizers do not split into the
    same tokens (mapped through the shared vocabulary) is refused."""

    student: Any  # Seq2SeqCollator or CausalCollator
    teacher: Any
    vocab: SharedVocab
    one_to_one: bool = False

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch, s_targets = self.student.collate_targets(rows)
        t_batch, t_targets = self.teacher.collate_targets(rows)
        if self.one_to_one:
            self._check_one_to_one(batch, t_batch)
        mapped = self.vocab.to_student
        keys = (*SPAN_KEYS, *(TEACHER_PREFIX + k for k in SPAN_KEYS[:3]),
                *((MAPPED_KEY,) if mapped is not None else ()))
        out: dict[str, list] = {k: [] for k in keys}
        s_base = t_base = spans = 0
        for s_ids, t_ids in zip(s_targets, t_targets):
            found = align(s_ids, t_ids, self.vocab)
            for prefix, base, positions in (("", s_base, found.student), (TEACHER_PREFIX, t_base, found.teacher)):
                for j, span in enumerate(positions):
                    out[prefix + "span_first"].append(base + span[0])
                    out[prefix + "span_rest"] += [base + k for k in span[1:]]
                    out[prefix + "span_rest_of"] += [spans + j] * (len(span) - 1)
            out["span_exact"] += [float(e) for e in found.exact]
            if mapped is not None:
                out[MAPPED_KEY] += [float(int(mapped[t_ids[tt[0]]]) == s_ids[ss[0]])
                                    for ss, tt in zip(found.student, found.teacher)]
            s_base, t_base, spans = s_base + len(s_ids), t_base + len(t_ids), spans + len(found.exact)
        batch.update({TEACHER_PREFIX + k: v for k, v in t_batch.items() if k != "weight"})
        batch.update({k: torch.tensor(v, dtype=torch.float32 if k in ("span_exact", MAPPED_KEY) else torch.long)
                      for k, v in out.items()})
        return batch

    def _check_one_to_one(self, s_batch: dict[str, torch.Tensor], t_batch: dict[str, torch.Tensor]) -> None:
        lookup = torch.full((len(self.vocab.student),), -1, dtype=torch.long)
        lookup[self.vocab.student_ids] = self.vocab.teacher_ids
        for key in ("input_ids", "labels"):
            s, t = s_batch[key], t_batch[key]
            mapped = torch.where(s == -100, s, lookup[s.clamp_min(0)])
            if s.shape != t.shape or not torch.equal(mapped, t):
                raise DistillError("hidden-state, attention and relation losses compare the two models position by "
                                   "position, and the tokenizers split this batch differently (its spans are not "
                                   "one-to-one): drop those terms for loss.cross_tokenizer")


def teacher_view(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The teacher's batch: its own keys in a cross-tokenizer batch, else the batch itself."""
    if TEACHER_PREFIX + "input_ids" not in batch:
        return batch
    return {k[len(TEACHER_PREFIX):]: v for k, v in batch.items() if k.startswith(TEACHER_PREFIX)}
