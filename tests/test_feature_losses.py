"""Feature losses against plain float64 references (explicit loops), padding, gradients, HF attention maps.
Every loss is a sum over the rows (tokens, query rows) picked by a LongTensor of flat indices."""

import math

import pytest
import torch
from torch.testing import assert_close

from distill.errors import DistillError
from distill.losses.features import (attention_log_probs, concat_heads, distribution_kl, hidden_distance,
                                     relation_log_probs)

B, T, D = 3, 7, 8


def _pad_mask(lengths, t):
    """(B, t) True on the first lengths[b] positions: right padding."""
    return torch.tensor([[i < n for i in range(t)] for n in lengths])


def idx(mask):
    """Flat indices of a mask's True entries (None stays None: every row), as the collator's indices."""
    return None if mask is None else mask.reshape(-1).nonzero().squeeze(1)


# ---------------------------------------------------------------- references (float64, python loops)


def _layer_norm(x):
    mean = sum(x) / len(x)
    var = sum((v - mean) ** 2 for v in x) / len(x)
    return [(v - mean) / math.sqrt(var + 1e-5) for v in x]


def ref_hidden(s, t, mask, metric, normalize):
    """Σ over the masked tokens of the per-token distance (mse: mean over the width)."""
    total = 0.0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if mask is not None and not mask[b, i]:
                continue
            x, y = s[b, i].double().tolist(), t[b, i].double().tolist()
            if normalize:
                x, y = _layer_norm(x), _layer_norm(y)
            if metric == "mse":
                total += sum((x[k] - y[k]) ** 2 for k in range(len(x)))
            else:
                dot = sum(x[k] * y[k] for k in range(len(x)))
                nx = math.sqrt(sum(v * v for v in x))
                ny = math.sqrt(sum(v * v for v in y))
                total += 1.0 - dot / (max(nx, 1e-8) * max(ny, 1e-8))
    return total / s.shape[-1] if metric == "mse" else total


def ref_softmax_rows(scores, allowed):
    """Probabilities over the allowed entries of one row (a python list); disallowed -> 0."""
    m = max(v for v, a in zip(scores, allowed) if a)
    e = [math.exp(v - m) if a else 0.0 for v, a in zip(scores, allowed)]
    z = sum(e)
    return [v / z for v in e]


def ref_attention(q, k, keep, scaling, bias):
    """Probabilities (B, H, Tq, Tk) as nested lists; None for rows with no allowed key."""
    b_, h_, tq, d = q.shape
    g = h_ // k.shape[1]
    keep = keep.expand(b_, h_, tq, k.shape[2])
    out = []
    for b in range(b_):
        heads = []
        for h in range(h_):
            rows = []
            for i in range(tq):
                scores, allowed = [], []
                for j in range(k.shape[2]):
                    dot = sum(float(q[b, h, i, x]) * float(k[b, h // g, j, x]) for x in range(d))
                    extra = 0.0 if bias is None else float(bias.expand(b_, h_, tq, -1)[b, h, i, j])
                    scores.append(dot * scaling + extra)
                    allowed.append(bool(keep[b, h, i, j]))
                rows.append(ref_softmax_rows(scores, allowed) if any(allowed) else None)
            heads.append(rows)
        out.append(heads)
    return out


def ref_kl(s, t, rows):
    """Σ over selected (b, a, i) of Σ_j p_T·(log p_T − log p_S), / A: the head-mean KL summed over rows."""
    b_, a_, tq, tk = s.shape
    total = 0.0
    for b in range(b_):
        for i in range(tq):
            if rows is not None and not rows[b, i]:
                continue
            for a in range(a_):
                for j in range(tk):
                    p = math.exp(float(t[b, a, i, j]))
                    if p > 0:
                        total += p * (float(t[b, a, i, j]) - float(s[b, a, i, j]))
    return total / a_


def _assert_probs(out, ref, atol=1e-5):
    probs = out.double().exp()
    checked = 0
    for b, heads in enumerate(ref):
        for h, rows in enumerate(heads):
            for i, row in enumerate(rows):
                if row is None:
                    continue
                assert_close(probs[b, h, i], torch.tensor(row, dtype=torch.float64), atol=atol, rtol=0)
                checked += 1
    assert checked > 0


# ---------------------------------------------------------------- hidden_distance


@pytest.mark.parametrize("metric", ["mse", "cosine"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("masked", [True, False])
def test_hidden_distance_matches_reference(metric, normalize, masked):
    torch.manual_seed(0)
    s, t = torch.randn(B, T, D) * 2 + 0.5, torch.randn(B, T, D)
    mask = _pad_mask([7, 4, 2], T) if masked else None
    got = hidden_distance(s, t, idx(mask), metric=metric, normalize=normalize)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(ref_hidden(s, t, mask, metric, normalize), rel=1e-5, abs=1e-7)
    got64 = hidden_distance(s.double(), t.double(), idx(mask), metric=metric, normalize=normalize)
    assert got64.dtype == torch.float64
    assert got64.item() == pytest.approx(ref_hidden(s, t, mask, metric, normalize), rel=1e-10)


@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_hidden_distance_padding_does_not_matter(metric):
    torch.manual_seed(1)
    s, t = torch.randn(B, T, D), torch.randn(B, T, D)
    mask = _pad_mask([7, 4, 0], T)  # last row fully padded
    base = hidden_distance(s, t, idx(mask), metric=metric, normalize=True)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 1e4 * torch.randn(int((~mask).sum()), D)
    t2[~mask] = float("nan")
    assert_close(hidden_distance(s2, t2, idx(mask), metric=metric, normalize=True), base, atol=0, rtol=0)


@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_hidden_distance_gradient_to_student_only(metric):
    torch.manual_seed(2)
    s = torch.randn(B, T, D, requires_grad=True)
    t = torch.randn(B, T, D, requires_grad=True)
    mask = _pad_mask([7, 0, 3], T)  # a fully padded row
    loss = hidden_distance(s, t, idx(mask), metric=metric)
    loss.backward()
    assert torch.isfinite(loss)
    assert t.grad is None
    assert torch.isfinite(s.grad).all()
    assert (s.grad[mask] != 0).any()
    assert (s.grad[~mask] == 0).all()


def test_hidden_distance_bf16_is_computed_in_float32():
    torch.manual_seed(3)
    s, t = torch.randn(B, T, D), torch.randn(B, T, D)
    got = hidden_distance(s.bfloat16(), t.bfloat16(), None)
    assert got.dtype == torch.float32
    ref = ref_hidden(s.bfloat16().float(), t.bfloat16().float(), None, "mse", False)
    assert got.item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_hidden_distance_empty_mask_is_zero_and_attached(metric):
    s = torch.randn(B, T, D, requires_grad=True)
    loss = hidden_distance(s, torch.randn(B, T, D), torch.zeros(0, dtype=torch.long), metric=metric, normalize=True)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (s.grad == 0).all()


def test_hidden_distance_bad_input():
    with pytest.raises(ValueError):
        hidden_distance(torch.randn(B, T, D), torch.randn(B, T, D + 1), None)
    with pytest.raises(DistillError, match="mse.*cosine"):
        hidden_distance(torch.randn(B, T, D), torch.randn(B, T, D), None, metric="l1")


# ---------------------------------------------------------------- attention_log_probs


def test_attention_log_probs_matches_reference_gqa_bias_mask():
    torch.manual_seed(4)
    b, h, h_kv, tq, tk, d = 2, 4, 2, 5, 6, 8
    q, k = torch.randn(b, h, tq, d), torch.randn(b, h_kv, tk, d)
    bias = torch.randn(1, h, tq, tk)
    keep = torch.rand(b, h, tq, tk) > 0.3
    keep &= _pad_mask([6, 4], tk)[:, None, None, :]
    keep[1, 2, 3] = False  # a row with no allowed key
    out = attention_log_probs(q, k, keep, scaling=0.3, position_bias=bias)
    assert out.shape == (b, h, tq, tk) and out.dtype == torch.float32
    assert not torch.isnan(out).any()
    has_key = keep.any(-1, keepdim=True).expand_as(keep)
    assert (out[~keep & has_key] < -1e30).all()  # disallowed: ~finfo.min (or -inf), probability 0
    assert torch.isfinite(out[1, 2, 3]).all()  # the row with no allowed key: finite, not NaN
    _assert_probs(out, ref_attention(q, k, keep, 0.3, bias))


def test_attention_log_probs_default_scaling_and_broadcast_keep():
    torch.manual_seed(5)
    b, h, t, d = 2, 3, 5, 4
    q, k = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    keep = causal[None, None] & _pad_mask([5, 3], t)[:, None, None, :]  # (B, 1, T, T)
    out = attention_log_probs(q, k, keep)
    assert out.shape == (b, h, t, t)
    _assert_probs(out, ref_attention(q, k, keep, d**-0.5, None))
    # None keep = everything allowed
    everything = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    _assert_probs(attention_log_probs(q, k, None), ref_attention(q, k, everything, d**-0.5, None))


def test_attention_log_probs_fully_masked_rows_no_nan():
    torch.manual_seed(6)
    q = torch.randn(2, 2, 4, 4, requires_grad=True)
    k = torch.randn(2, 1, 4, 4, requires_grad=True)
    keep = _pad_mask([4, 0], 4)[:, None, None, :]  # second sequence has no key at all
    # an HF-style additive mask already holding finfo.min must not overflow to -inf -> NaN
    bias = torch.zeros(2, 1, 1, 4)
    bias[1] = torch.finfo(torch.float32).min
    out = attention_log_probs(q, k, keep, position_bias=bias)
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert (q.grad[1] == 0).all()
    # the bias alone masking a whole row with -inf (some HF masks do): still finite, no NaN
    bias[1] = float("-inf")
    out = attention_log_probs(q, k, None, position_bias=bias)
    assert torch.isfinite(out).all()
    assert_close(out[0], attention_log_probs(q, k, None)[0])


def test_attention_log_probs_bf16_in_float32_out():
    torch.manual_seed(7)
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    out = attention_log_probs(q.bfloat16(), k.bfloat16(), None)
    assert out.dtype == torch.float32
    everything = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    _assert_probs(out, ref_attention(q.bfloat16().float(), k.bfloat16().float(), everything, 0.5, None))


def test_attention_log_probs_bad_heads():
    with pytest.raises(ValueError, match="multiple"):
        attention_log_probs(torch.randn(1, 4, 3, 4), torch.randn(1, 3, 3, 4), None)
    with pytest.raises(ValueError):
        attention_log_probs(torch.randn(1, 4, 3, 4), torch.randn(1, 2, 3, 5), None)


# ---------------------------------------------------------------- relation_log_probs, concat_heads


def test_relation_log_probs_matches_reference():
    torch.manual_seed(8)
    b, t, w, heads = 2, 5, 12, 3
    x = torch.randn(b, t, w)
    keep = _pad_mask([5, 3], t)[:, None, None, :]
    out = relation_log_probs(x, heads, keep)
    assert out.shape == (b, heads, t, t) and out.dtype == torch.float32
    d_r = w // heads
    ref = []
    for bb in range(b):
        ref_heads = []
        for a in range(heads):
            rows = []
            for i in range(t):
                scores, allowed = [], []
                for j in range(t):
                    dot = sum(float(x[bb, i, a * d_r + c]) * float(x[bb, j, a * d_r + c]) for c in range(d_r))
                    scores.append(dot / math.sqrt(d_r))
                    allowed.append(bool(keep[bb, 0, 0, j]))
                rows.append(ref_softmax_rows(scores, allowed))
            ref_heads.append(rows)
        ref.append(ref_heads)
    _assert_probs(out, ref)


def test_relation_log_probs_heads_must_divide_width():
    with pytest.raises(DistillError, match="divide the width W=10"):
        relation_log_probs(torch.randn(1, 3, 10), 4, None)


def test_concat_heads_is_head_major():
    torch.manual_seed(9)
    x = torch.randn(2, 3, 4, 5)
    out = concat_heads(x)
    assert out.shape == (2, 4, 15)
    for b in range(2):
        for h in range(3):
            for t in range(4):
                for i in range(5):
                    assert out[b, t, h * 5 + i] == x[b, h, t, i]


# ---------------------------------------------------------------- distribution_kl


@pytest.mark.parametrize("fill", [float("-inf"), torch.finfo(torch.float32).min])
@pytest.mark.parametrize("with_rows", [True, False])
def test_distribution_kl_matches_reference(fill, with_rows):
    torch.manual_seed(10)
    b, a, tq, tk = 2, 3, 4, 5
    holes = torch.rand(b, a, tq, tk) < 0.3
    holes[..., 0] = False  # every row keeps at least one entry
    s = torch.randn(b, a, tq, tk).masked_fill(holes, fill).log_softmax(-1)
    t = (2 * torch.randn(b, a, tq, tk)).masked_fill(holes, fill).log_softmax(-1)
    rows = _pad_mask([4, 2], tq) if with_rows else None
    got = distribution_kl(s, t, idx(rows))
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert got.item() == pytest.approx(ref_kl(s, t, rows), rel=1e-5)
    got64 = distribution_kl(s.double(), t.double(), idx(rows))
    assert got64.dtype == torch.float64 and got64.item() == pytest.approx(ref_kl(s, t, rows), rel=1e-10)


def test_distribution_kl_padding_rows_do_not_matter():
    torch.manual_seed(11)
    b, a, tq, tk = 2, 2, 4, 4
    s, t = torch.randn(b, a, tq, tk).log_softmax(-1), torch.randn(b, a, tq, tk).log_softmax(-1)
    rows = _pad_mask([4, 1], tq)
    base = distribution_kl(s, t, idx(rows))
    s2, t2 = s.clone(), t.clone()
    pad = ~rows[:, None, :, None].expand(b, a, tq, tk)
    s2[pad] = float("nan")
    t2[pad] = 5.0
    assert_close(distribution_kl(s2, t2, idx(rows)), base, atol=0, rtol=0)


def test_distribution_kl_masked_on_both_sides_no_nan_in_gradient():
    torch.manual_seed(12)
    for fill in (float("-inf"), torch.finfo(torch.float32).min):
        z = torch.randn(1, 2, 3, 4, requires_grad=True)
        holes = torch.tensor([False, True, False, True])
        s = z.masked_fill(holes, fill).log_softmax(-1)
        t = torch.randn(1, 2, 3, 4).masked_fill(holes, fill).log_softmax(-1)
        loss = distribution_kl(s, t, None)
        loss.backward()
        assert torch.isfinite(loss) and loss > 0
        assert torch.isfinite(z.grad).all() and (z.grad[..., holes] == 0).all()


def test_distribution_kl_no_rows_zero_attached_and_shape_check():
    s = torch.randn(2, 2, 3, 3, requires_grad=True)
    no_rows = torch.zeros(2, 3, dtype=torch.bool)  # no query row at all
    loss = distribution_kl(s.log_softmax(-1), torch.randn(2, 2, 3, 3).log_softmax(-1), idx(no_rows))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (s.grad == 0).all()
    with pytest.raises(ValueError):
        distribution_kl(torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 4), None)
