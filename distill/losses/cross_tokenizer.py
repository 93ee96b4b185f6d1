"""Logit distillation across tokenizers (``loss.cross_tokenizer``): the kd term over aligned spans
(``distill.data.token_alignment``) instead of target tokens.

A span's distribution. A span of m tokens t_1..t_m is one model's way of writing that text. Its
distribution is the first token's, p_1(v), scaled by the chain-rule probability of the span's other
actual tokens, c = Π_{j≥2} p_j(t_j): the probability of writing the span's text, spread over how it may
start. Both sides' vectors (at temperature τ) are compared by

* ``uld`` (Universal Logit Distillation): τ² · Σ_i |x_(i) − y_(i)|, the L1 distance between the two
  scaled probability vectors sorted by value, over the top ``loss.uld_top_k`` entries of each plus one
  bucket of the rest (the vector of the smaller vocabulary is padded with zeros, so with ``uld_top_k``
  null the distance is exact; with a cut-off the rest bucket gives its lower bound);
* ``hybrid``: on spans of one token that both vocabularies hold (same bytes, or the same special
  role), ``loss.divergence`` between the two distributions renormalized over the shared tokens; ULD on
  the others, weighted by ``loss.uld_weight``. Logged as ``kd/shared`` and ``kd/uld``; with ``uld_weight`` 0
  the ULD spans get CE only, and neither ULD nor its passes run.

Both parts average over the step's spans (the ``span`` count).

``mined`` (MinED, Wan et al. 2024) reads the teacher's whole distribution on the student's vocabulary
instead: each teacher token's probability goes to its nearest student token by edit distance
(``token_alignment.mined_map``), so q(v) = Σ_{t → v} p_T(t), and ``loss.divergence`` compares q with the
student's distribution at the first row of every span whose first tokens agree under the map (every
shared 1:1 span; a split such as A's " 1998" against B's " 199" + "8"): ``kd/mapped``. Every other target
row reads the gold token, as CE (``kd/gold``: the one-hot target FuseLLM and DSKD use where the alignment
fails), so the teacher never pulls a row towards a spelling the student does not use. Both average over
the student's target rows (the ``target`` count), with no chain-rule scale and no pass before the
objective's. The gradient is exact, continuation
rows included, without any rows × vocabulary tensor: ``span_rows`` runs three passes without gradient
(each side's continuation log-probabilities, then ∂ULD/∂log c per span), and the objective's one pass
over the student's target rows, with gradient, takes the span terms at each span's first row and the
continuation term c's gradient at the others (``continuation``: its value is not part of the loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.divergences import per_token_divergence
from distill.losses.fused_head import RowFn, RowSum, Side, row_values

# each mode's parts of the kd term and the count each averages over
CROSS_PARTS = {"uld": {"kd": "span"}, "hybrid": {"kd/shared": "span", "kd/uld": "span"},
               "mined": {"kd/mapped": "target", "kd/gold": "target"}}
TEACHER_PREFIX = "teacher."  # the teacher's own batch keys in a cross-tokenizer batch (the collator writes them)


# ---- the math, per row ----------------------------------------------------------------------------

def tempered_log_prob(logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """log softmax(z/τ)[label] per row."""
    z = logits / temperature
    return z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - z.logsumexp(-1)


def _sorted_mass(logits: Tensor, log_scale: Tensor, temperature: float, length: int) -> Tensor:
    """(N, length + 1): e^{log_scale} · the ``length`` largest probabilities of softmax(z/τ), then the rest."""
    p = F.softmax(logits / temperature, dim=-1)
    top = p.topk(length, dim=-1, sorted=True).values
    rest = (1.0 - top.sum(-1, keepdim=True)).clamp_min(0.0)
    return torch.cat([top, rest], dim=-1) * log_scale.exp().unsqueeze(-1)


def _uld_length(s_vocab: int, t_vocab: int, top_k: Optional[int]) -> int:
    return min(s_vocab, t_vocab, top_k or s_vocab)


def uld(s_logits: Tensor, t_logits: Tensor, s_log_scale: Tensor, t_log_scale: Tensor, temperature: float,
        top_k: Optional[int]) -> Tensor:
    """τ² · ‖sort(x) − sort(y)‖₁ per row, x and y each side's scaled probabilities (module docstring)."""
    length = _uld_length(s_logits.shape[-1], t_logits.shape[-1], top_k)
    x = _sorted_mass(s_logits, s_log_scale, temperature, length)
    y = _sorted_mass(t_logits.detach(), t_log_scale.detach(), temperature, length)
    return temperature**2 * (x - y).abs().sum(-1)


def uld_log_scale_grad(s_logits: Tensor, t_logits: Tensor, s_log_scale: Tensor, t_log_scale: Tensor,
                       temperature: float, top_k: Optional[int]) -> Tensor:
    """∂ ``uld`` / ∂ ``s_log_scale`` per row: τ² · Σ sign(x − y) · x, since ∂x/∂log c = x."""
    length = _uld_length(s_logits.shape[-1], t_logits.shape[-1], top_k)
    x = _sorted_mass(s_logits, s_log_scale, temperature, length)
    y = _sorted_mass(t_logits, t_log_scale, temperature, length)
    return temperature**2 * (torch.sign(x - y) * x).sum(-1)


def shared_divergence(s_logits: Tensor, t_logits: Tensor, s_ids: Tensor, t_ids: Tensor, kind: str,
                      temperature: float, beta: float = 0.5, alpha: float = 0.1, lam: float | Tensor = 0.0) -> Tensor:
    """τ² · D between the two distributions renormalized over the shared tokens (``s_ids[i]`` is ``t_ids[i]``).
    Mass outside them is left out on both sides rather than pooled: the teacher's mass on a word only it holds
    whole belongs to the first piece of the student's spelling of that word, not to its other tokens."""
    return temperature**2 * per_token_divergence(s_logits.index_select(-1, s_ids) / temperature,
                                                 t_logits.detach().index_select(-1, t_ids) / temperature, kind,
                                                 beta=beta, alpha=alpha, lam=lam)


def mapped_divergence(s_logits: Tensor, t_logits: Tensor, s_ids: Tensor, t_ids: Tensor, kind: str,
                      temperature: float, beta: float = 0.5, alpha: float = 0.1) -> Tensor:
    """τ² · D(q ‖ softmax(z_S/τ)) per row, q the teacher's softmax(z_T/τ) over the mapped teacher tokens
    ``t_ids`` summed into their student tokens ``s_ids`` (``SharedVocab.mined_pairs``). q is 0 on student
    tokens no teacher token maps to, so reverse KL and TAID are refused with ``mined`` (settings)."""
    p = F.softmax(t_logits.detach().index_select(-1, t_ids) / temperature, dim=-1)
    q = p.new_zeros(p.shape[0], s_logits.shape[-1]).index_add_(1, s_ids, p)
    return temperature**2 * per_token_divergence(s_logits / temperature, q.log(), kind, beta=beta, alpha=alpha)


# ---- per-row context over the student's target rows ----------------------------------------------

@dataclass
class SpanRows:
    """What the span terms need at each of the student's target rows (N,): the teacher's hidden row of
    the span a row starts (``teacher``, for the objective's pass), which part scores it, both sides'
    log c, and at continuation rows the coefficient of their tempered log-probability in the gradient."""

    teacher: Side  # (N, d): the teacher's first row of the span starting here (row 0 elsewhere, unused)
    uld: Tensor  # (N,) bool: the row starts a span scored by ULD
    shared: Tensor  # (N,) bool: the row starts a span scored over the shared vocabulary
    s_log_scale: Tensor
    t_log_scale: Tensor
    continuation: Tensor  # (N,) ∂(weighted loss)/∂ log p(label) at continuation rows, 0 elsewhere
    shared_ids: tuple[Tensor, Tensor]  # (M,) each: the shared tokens' student and teacher ids
    chained: bool = True  # some span is scored by ULD, so the continuation term has a gradient to carry


def span_rows(batch: dict[str, Tensor], student: Side, teacher: Side, s_labels: Tensor, t_labels: Tensor,
              mode: str, temperature: float, top_k: Optional[int], coef: Tensor | float,
              shared_ids: tuple[Tensor, Tensor], budget_mib: Optional[float], uld_spans: bool = True) -> SpanRows:
    """The three passes without gradient (module docstring). ``coef``: the ULD spans' weight over the span count;
    ``uld_spans`` False (hybrid with ``loss.uld_weight`` 0): no span is scored by ULD, so none of the passes runs."""
    first, rest, rest_of = batch["span_first"], batch["span_rest"], batch["span_rest_of"]
    t_first, t_rest, t_rest_of = (batch[TEACHER_PREFIX + k] for k in ("span_first", "span_rest", "span_rest_of"))
    n, spans, device = student.hidden.shape[0], first.shape[0], student.hidden.device
    exact = batch["span_exact"] > 0 if mode == "hybrid" else torch.zeros(spans, dtype=torch.bool, device=device)

    def log_scale(side: Side, labels: Tensor, rows: Tensor, of: Tensor, own_forward: bool) -> Tensor:
        cont = row_values(Side(side.hidden.index_select(0, rows), side.head),
                          None, lambda z, _, r: tempered_log_prob(z, labels.index_select(0, rows)[r], temperature),
                          budget_mib, own_forward)
        return cont.new_zeros(spans).index_add_(0, of, cont)

    if uld_spans:
        s_scale = log_scale(student, s_labels, rest, rest_of, True)
        t_scale = log_scale(teacher, t_labels, t_rest, t_rest_of, False)
        grad = row_values(Side(student.hidden.index_select(0, first), student.head),
                          Side(teacher.hidden.index_select(0, t_first), teacher.head),
                          lambda s, t, r: torch.where(exact[r], 0.0, uld_log_scale_grad(s, t, s_scale[r], t_scale[r],
                                                                                          temperature, top_k)),
                          budget_mib)
    else:
        s_scale = t_scale = grad = student.hidden.new_zeros(spans)
    if teacher.hidden.shape[0] == 0:  # no teacher targets (so no spans): a row for the unused pairs
        teacher = Side(teacher.hidden.new_zeros(1, teacher.hidden.shape[1]), teacher.head)
    at_first = lambda values, fill: torch.full((n,), fill, dtype=values.dtype, device=device).index_copy_(  # noqa: E731
        0, first, values)
    t_index = at_first(t_first, 0)
    return SpanRows(teacher=Side(teacher.hidden.index_select(0, t_index), teacher.head),
                    uld=at_first(~exact, False), shared=at_first(exact, False),
                    s_log_scale=at_first(s_scale, 0.0), t_log_scale=at_first(t_scale, 0.0),
                    continuation=grad.new_zeros(n).index_copy_(0, rest, (grad * coef).index_select(0, rest_of)),
                    shared_ids=shared_ids, chained=uld_spans)


@dataclass
class MappedRows:
    """``mined``: at each of the student's target rows (N,), the teacher's first row of the span it starts
    (``teacher``, row 0 elsewhere, unused) and whether the span's first tokens agree under the map."""

    teacher: Side
    mapped: Tensor  # (N,) bool
    pairs: tuple[Tensor, Tensor]  # (student ids, teacher ids): SharedVocab.mined_pairs


def mapped_rows(batch: dict[str, Tensor], student: Side, teacher: Side, pairs: tuple[Tensor, Tensor]) -> MappedRows:
    """The per-row context of ``mined``, from the span indices alone (no pass over the heads)."""
    first, t_first = batch["span_first"], batch[TEACHER_PREFIX + "span_first"]
    n, device = student.hidden.shape[0], student.hidden.device
    if teacher.hidden.shape[0] == 0:  # no teacher targets (so no spans): a row for the unused pairs
        teacher = Side(teacher.hidden.new_zeros(1, teacher.hidden.shape[1]), teacher.head)
    t_index = torch.zeros(n, dtype=torch.long, device=device).index_copy_(0, first, t_first)
    mapped = torch.zeros(n, dtype=torch.bool, device=device).index_copy_(0, first, batch["span_mapped"] > 0)
    return MappedRows(Side(teacher.hidden.index_select(0, t_index), teacher.head), mapped, pairs)


def mapped_row_fns(rows: MappedRows, labels: Tensor, kind: str, temperature: float, beta: float,
                   alpha: float) -> dict[str, RowFn]:
    """``mined``'s parts as functions of one chunk of (student, span-teacher) logits."""
    s_ids, t_ids = rows.pairs

    def mapped_fn(s: Tensor, t: Tensor, r: slice) -> Tensor:
        value = mapped_divergence(s, t, s_ids, t_ids, kind, temperature, beta, alpha)
        return torch.where(rows.mapped[r], value, 0.0)

    def gold_fn(s: Tensor, t: Tensor, r: slice) -> Tensor:
        return torch.where(rows.mapped[r], 0.0, F.cross_entropy(s, labels[r], reduction="none"))

    return {"kd/mapped": mapped_fn, "kd/gold": gold_fn}


def span_row_fns(rows: SpanRows, mode: str, kind: str, temperature: float, top_k: Optional[int], uld_weight: float,
                 beta: float, alpha: float, lam: float | Tensor) -> dict[str, RowFn]:
    """The kd term's parts, as functions of one chunk of (student, span-teacher) logits; ``uld_weight``
    scales the ULD spans (``loss.uld_weight``, 1 with ``uld``)."""
    def uld_fn(s: Tensor, t: Tensor, r: slice) -> Tensor:
        value = uld(s, t, rows.s_log_scale[r], rows.t_log_scale[r], temperature, top_k)
        return torch.where(rows.uld[r], uld_weight * value, 0.0)

    if mode == "uld":
        return {"kd": uld_fn}
    s_ids, t_ids = rows.shared_ids

    def shared_fn(s: Tensor, t: Tensor, r: slice) -> Tensor:
        value = shared_divergence(s, t, s_ids, t_ids, kind, temperature, beta, alpha, lam)
        return torch.where(rows.shared[r], value, 0.0)

    return {"kd/shared": shared_fn, **({"kd/uld": uld_fn} if uld_weight else {})}


def cross_parts(mode: str, uld_weight: float) -> dict[str, str]:
    """The kd term's parts for ``mode`` and the count each averages over: hybrid without ULD spans has one."""
    parts = dict(CROSS_PARTS[mode])
    if mode == "hybrid" and not uld_weight:
        del parts["kd/uld"]
    return parts


def continuation(rows: SpanRows, labels: Tensor, temperature: float) -> RowSum:
    """The term whose gradient carries ∂loss/∂log c into the continuation rows; the caller subtracts its value."""
    return RowSum(lambda s, t, r: rows.continuation[r] * tempered_log_prob(s, labels[r], temperature), 1.0)
