"""Losses against plain float64 references written independently (explicit softmax, loops). Every
logit loss runs through the fused head pass (``head_pass``) with identity heads, so the logits are the
hidden rows: a sum over the rows picked by a LongTensor of flat indices, chunk by chunk."""

import math
from typing import get_args

import pytest
import torch
from torch.testing import assert_close

from distill.errors import DistillError
from distill.losses.divergences import DIVERGENCES, Divergence, crop_vocab, per_token_divergence, scaled_divergence
from distill.losses.features import HIDDEN_METRICS, HiddenMetric
from distill.losses.fused_head import RowSum, Side, head_pass, row_bytes
from distill.losses.schedules import SCHEDULES, Schedule
from distill.losses.taid import TAID_MODES, TaidMode
from test_terms_fakes import logits_output

B, T, V = 3, 7, 11
PARAMS = {"beta": 0.3, "alpha": 0.2, "lam": 0.6}


# ---------------------------------------------------------------- references (float64, no log-space tricks)


def _softmax(z):
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def kl_rows(a, b):
    return sum(a[i] * math.log(a[i] / b[i]) for i in range(len(a)) if a[i] > 0)


def ref_div(kind, q, p, beta, alpha, taid_target):
    """D(p ‖ q) of the student's q and the teacher's p (lists of probabilities); TAID's target r given."""
    if kind == "forward_kl":
        return kl_rows(p, q)
    if kind == "reverse_kl":
        return kl_rows(q, p)
    if kind == "jsd":
        m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
        return beta * kl_rows(p, m) + (1 - beta) * kl_rows(q, m)
    if kind == "skew_kl":
        return kl_rows(p, [alpha * a + (1 - alpha) * b for a, b in zip(p, q)])
    if kind == "skew_reverse_kl":
        return kl_rows(q, [alpha * b + (1 - alpha) * a for a, b in zip(p, q)])
    if kind == "taid":
        return kl_rows(taid_target, q)
    raise AssertionError(kind)


def ref_token(kind, zs, zt, beta, alpha, lam):
    """One token's divergence; zs, zt are 1-D float64 logits already divided by τ."""
    return ref_div(kind, _softmax(zs).tolist(), _softmax(zt).tolist(), beta, alpha,
                   _softmax((1 - lam) * zs + lam * zt).tolist())
    raise AssertionError(kind)


def ref_loss(kind, s, t, mask, temperature=1.0, beta=0.5, alpha=0.1, lam=0.0):
    """τ² · the sum over the masked tokens."""
    s, t = s.double(), t.double()
    v = min(s.shape[-1], t.shape[-1])
    total = 0.0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if mask[b, i]:
                total += ref_token(kind, s[b, i, :v] / temperature, t[b, i, :v] / temperature, beta, alpha, lam)
    return torch.tensor(temperature**2 * total, dtype=torch.float64)


def ref_ce(logits, labels, ignore_index=-100, eps=0.0):
    logits = logits.double().reshape(-1, logits.shape[-1])
    total = 0.0
    for row, y in zip(logits, labels.reshape(-1).tolist()):
        if y == ignore_index:
            continue
        logq = torch.log(_softmax(row))
        total += (1 - eps) * -logq[y].item() + eps * -logq.mean().item()
    return torch.tensor(total, dtype=torch.float64)


def idx(mask):
    """Flat indices of a mask's True entries, as the collator's target_index/source_index."""
    return mask.reshape(-1).nonzero().squeeze(1)


def budget_for(rows, *vocabs):
    """The ``logit_chunk_mib`` that makes chunks of ``rows`` rows."""
    return rows * row_bytes(vocabs, torch.device("cpu")) / 2**20


def _pass(student, teacher, index, fn, budget_mib):
    index = torch.arange(student[..., 0].numel()) if index is None else index
    s = logits_output(student, index)
    t = None if teacher is None else logits_output(teacher, index)
    return head_pass(Side(s.hidden, s.head), None if t is None else Side(t.hidden, t.head), [RowSum(fn, 1.0)],
                     budget_mib)[0]


def logit_divergence(student, teacher, index, kind="forward_kl", temperature=1.0, budget_mib=1.0, **params):
    """τ² · Σ over the rows ``index`` (None: all) of the divergence, through the fused pass."""
    return _pass(student, teacher, index, lambda s, t, rows: scaled_divergence(s, t, kind, temperature, **params),
                 budget_mib)


def cross_entropy(logits, labels, index, label_smoothing=0.0, budget_mib=1.0):
    target = labels.reshape(-1).index_select(0, index)
    return _pass(logits, None, index, lambda s, t, rows: torch.nn.functional.cross_entropy(
        s, target[rows], reduction="none", label_smoothing=label_smoothing), budget_mib)


# ---------------------------------------------------------------- fixtures


def make_batch(seed, vs=V, vt=V, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, vs, generator=g, dtype=dtype) * scale
    t = torch.randn(B, T, vt, generator=g, dtype=dtype) * scale
    mask = torch.rand(B, T, generator=g) > 0.4
    mask[0] = False  # one fully padded row
    mask[1, 0] = True  # never fully empty overall
    return s, t, mask


# ---------------------------------------------------------------- divergences


def test_option_names_come_from_the_config_types():
    assert DIVERGENCES == get_args(Divergence)
    assert DIVERGENCES == ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "taid")
    assert TAID_MODES == get_args(TaidMode) == ("constant", "linear", "adaptive")
    assert HIDDEN_METRICS == get_args(HiddenMetric) == ("mse", "cosine")
    assert SCHEDULES == get_args(Schedule) == ("constant", "linear", "cosine")


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(kind, seed):
    s, t, mask = make_batch(seed)
    got = logit_divergence(s, t, idx(mask), kind, temperature=2.0, **PARAMS)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert_close(got.double(), ref_loss(kind, s, t, mask, 2.0, **PARAMS), rtol=1e-5, atol=1e-6)
    # float64 input stays float64 and matches tightly
    got64 = logit_divergence(s.double(), t.double(), idx(mask), kind, temperature=2.0, **PARAMS)
    assert got64.dtype == torch.float64
    assert_close(got64, ref_loss(kind, s, t, mask, 2.0, **PARAMS), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_bf16_inputs_computed_in_float32(kind):
    s, t, mask = make_batch(2)
    s16, t16 = s.bfloat16(), t.bfloat16()
    got = logit_divergence(s16, t16, idx(mask), kind, **PARAMS)
    assert got.dtype == torch.float32
    assert_close(got.double(), ref_loss(kind, s16.float(), t16.float(), mask, **PARAMS), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_padding_values_never_matter(kind):
    s, t, mask = make_batch(3)
    base = logit_divergence(s, t, idx(mask), kind, **PARAMS)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 1e4  # garbage, even extreme, at padded positions
    t2[~mask] = float("nan")
    assert_close(logit_divergence(s2, t2, idx(mask), kind, **PARAMS), base, rtol=0, atol=0)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_no_token_is_zero_with_graph(kind):
    s, t, _ = make_batch(4)
    s.requires_grad_(True)
    loss = logit_divergence(s, t, torch.zeros(0, dtype=torch.long), kind, temperature=2.0, **PARAMS)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(s.grad) == 0


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_gradient_reaches_student_only(kind):
    s, t, mask = make_batch(5)
    s.requires_grad_(True)
    t.requires_grad_(True)
    logit_divergence(s, t, idx(mask), kind, temperature=2.0, **PARAMS).backward()
    assert t.grad is None
    assert torch.isfinite(s.grad).all()
    assert s.grad[mask].abs().sum() > 0
    assert torch.count_nonzero(s.grad[~mask]) == 0


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "taid"])
def test_gradient_matches_float64_autograd(kind):
    s, t, mask = make_batch(6)
    s32 = s.clone().requires_grad_(True)
    s64 = s.double().requires_grad_(True)
    logit_divergence(s32, t, idx(mask), kind, temperature=1.5, **PARAMS).backward()
    logit_divergence(s64, t.double(), idx(mask), kind, temperature=1.5, **PARAMS).backward()
    assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_temperature_squared_factor(kind):
    s, t, mask = make_batch(7)
    tau = 3.0
    scaled = logit_divergence(s, t, idx(mask), kind, temperature=tau, **PARAMS)
    # same distributions at τ=1 from pre-divided logits: the only difference is τ²
    plain = logit_divergence(s / tau, t / tau, idx(mask), kind, temperature=1.0, **PARAMS)
    assert_close(scaled, tau**2 * plain, rtol=1e-5, atol=1e-6)


def test_jsd_half_is_symmetric():
    s, t, mask = make_batch(8)
    assert_close(logit_divergence(s, t, idx(mask), "jsd", beta=0.5), logit_divergence(t, s, idx(mask), "jsd", beta=0.5))


def test_jsd_beta_swaps_with_arguments():
    s, t, mask = make_batch(8)
    assert_close(logit_divergence(s, t, idx(mask), "jsd", beta=0.2), logit_divergence(t, s, idx(mask), "jsd", beta=0.8))


def test_skew_alpha_zero_is_plain_kl():
    s, t, mask = make_batch(9)
    rows = idx(mask)
    assert_close(logit_divergence(s, t, rows, "skew_kl", alpha=0.0), logit_divergence(s, t, rows, "forward_kl"))
    assert_close(logit_divergence(s, t, rows, "skew_reverse_kl", alpha=0.0), logit_divergence(s, t, rows, "reverse_kl"))


def test_taid_endpoints():
    s, t, mask = make_batch(10)
    assert_close(logit_divergence(s, t, idx(mask), "taid", lam=1.0), logit_divergence(s, t, idx(mask), "forward_kl"))
    assert logit_divergence(s, t, idx(mask), "taid", lam=0.0).abs().item() < 1e-6  # target = student itself


def test_divergences_vanish_when_equal():
    s, _, mask = make_batch(11)
    for kind in DIVERGENCES:
        assert logit_divergence(s, s.clone(), idx(mask), kind, **PARAMS).abs().item() < 1e-6


def test_vocab_crop_padding_rows():
    s, t, mask = make_batch(12, vs=V, vt=V + 8)
    t[..., V:] = 50.0  # padding rows of the teacher's head must be dropped, whatever they hold
    cs, ct = crop_vocab(s, t)
    assert cs.shape[-1] == ct.shape[-1] == V
    for kind in DIVERGENCES:
        got = logit_divergence(s, t, idx(mask), kind, **PARAMS)
        assert_close(got, logit_divergence(s, t[..., :V], idx(mask), kind, **PARAMS))
        assert_close(got.double(), ref_loss(kind, s, t, mask, **PARAMS), rtol=1e-5, atol=1e-6)
    # and the other way round (student padded)
    cs, ct = crop_vocab(t, s)
    assert cs.shape[-1] == ct.shape[-1] == V


def test_no_index_means_all_tokens_and_flat_rows():
    s, t, _ = make_batch(13)
    full = torch.ones(B, T, dtype=torch.bool)
    assert_close(logit_divergence(s, t, None, "jsd"), logit_divergence(s, t, idx(full), "jsd"))
    # per-token function on pre-selected rows, summed, equals the loss at τ=1
    rows = per_token_divergence(s.reshape(-1, V), t.reshape(-1, V), "jsd")
    assert rows.shape == (B * T,)
    assert_close(rows.sum(), logit_divergence(s, t, idx(full), "jsd"))


def test_rows_are_picked_by_index_in_any_order_and_repeated():
    """The index is a list of rows, not a mask: a permuted index gives the same sum, a repeated row counts twice."""
    s, t, mask = make_batch(16)
    rows = idx(mask)
    base = logit_divergence(s, t, rows, "forward_kl")
    assert_close(logit_divergence(s, t, rows.flip(0), "forward_kl"), base)
    twice = logit_divergence(s, t, torch.cat([rows, rows[:1]]), "forward_kl")
    assert_close(twice - base, logit_divergence(s, t, rows[:1], "forward_kl"))


def test_infinite_logits_do_not_give_nan():
    """The row functions themselves (an identity matmul would turn -inf into NaN before them)."""
    s, t, mask = make_batch(14)
    t[..., 0] = float("-inf")  # a banned token in the teacher: p = 0 there
    s, t = s[mask], t[mask]
    for kind in DIVERGENCES:
        loss = scaled_divergence(s, t, kind, **PARAMS).sum()
        # KL(q ‖ p) with p = 0 < q is truly infinite; every other kind stays finite (0·log 0 = 0)
        assert torch.isinf(loss) if kind == "reverse_kl" else torch.isfinite(loss), kind
        if kind != "reverse_kl":
            s1 = s.clone().requires_grad_(True)
            scaled_divergence(s1, t, kind, **PARAMS).sum().backward()
            assert torch.isfinite(s1.grad).all(), kind


def test_bad_arguments():
    s, t, mask = make_batch(15)
    with pytest.raises(DistillError, match="unknown divergence"):
        logit_divergence(s, t, idx(mask), "kl")
    with pytest.raises(DistillError):
        logit_divergence(s, t, idx(mask), "jsd", beta=1.0)
    with pytest.raises(DistillError):
        logit_divergence(s, t, idx(mask), "forward_kl", temperature=0.0)


# ---------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_matches_reference(eps):
    g = torch.Generator().manual_seed(20)
    logits = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0] = -100
    labels[2, 3:] = -100
    rows = idx(labels != -100)
    got = cross_entropy(logits, labels, rows, label_smoothing=eps)
    assert_close(got.double(), ref_ce(logits, labels, eps=eps), rtol=1e-5, atol=1e-6)
    got64 = cross_entropy(logits.double(), labels, rows, label_smoothing=eps)
    assert_close(got64, ref_ce(logits, labels, eps=eps), rtol=1e-10, atol=1e-12)
    # padding logits are never read
    logits2 = logits.clone()
    logits2[labels == -100] = float("nan")
    assert_close(cross_entropy(logits2, labels, rows, label_smoothing=eps), got, rtol=0, atol=0)
    # bf16 input computed in float32
    got16 = cross_entropy(logits.bfloat16(), labels, rows, label_smoothing=eps)
    assert got16.dtype == torch.float32
    assert_close(got16.double(), ref_ce(logits.bfloat16().float(), labels, eps=eps), rtol=1e-5, atol=1e-6)


def test_cross_entropy_no_token_is_zero_not_nan():
    logits = torch.randn(2, 4, V, requires_grad=True)
    labels = torch.full((2, 4), -100)
    loss = cross_entropy(logits, labels, idx(labels != -100), label_smoothing=0.1)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "taid"])
def test_chunked_divergence_equals_unchunked_with_gradients(kind):
    """Chunks of 1 and 3 tokens against the whole-tensor computation: loss and gradient, float64,
    with padding and a teacher vocabulary padded by 3 rows."""
    torch.manual_seed(0)
    student = torch.randn(2, 5, 11, dtype=torch.float64) * 3
    teacher = torch.randn(2, 5, 14, dtype=torch.float64) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    tau, params = 1.7, dict(beta=0.3, alpha=0.2, lam=0.4)

    ref_in = student.clone().requires_grad_()
    values = per_token_divergence(ref_in[mask] / tau, teacher[mask][:, :11] / tau, kind, **params)
    reference = tau**2 * values.sum()
    reference.backward()
    for rows in (1, 3, 100):  # 1 row, 3 rows, everything at once
        x = student.clone().requires_grad_()
        loss = logit_divergence(x, teacher, idx(mask), kind, tau, budget_for(rows, 11, 14), **params)
        loss.backward()
        torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, ref_in.grad, rtol=1e-10, atol=1e-12)
        assert torch.all(x.grad[~mask] == 0)
