"""Divergences against a cached top-K teacher (``TopK``), checked against the dense divergences when every
token is kept and against plain float64 references over the K+1 buckets otherwise."""

import math

import pytest
import torch
from torch.testing import assert_close

from distill.errors import DistillError
from distill.losses.divergences import DIVERGENCES, scaled_divergence
from distill.losses.fused_head import RowSum, Side, head_pass, row_bytes
from distill.losses.sparse_teacher import TopK, bucket_log_probs
from distill.models.lm_head import Head
from test_losses import ref_div  # the textbook formulas over probabilities

N, V, K = 5, 13, 4
PARAMS = {"beta": 0.3, "alpha": 0.2, "lam": 0.6}


def make(seed, n=N, v=V, k=K, scale=3.0):
    """(student logits, teacher's full logits, its top-K cache with the kept ids in shuffled order), float64."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    top = t.topk(k, dim=-1).indices
    ids = top.gather(-1, torch.stack([torch.randperm(k, generator=g) for _ in range(n)]))
    return s, t, TopK(ids, t.gather(-1, ids), t.logsumexp(dim=-1), v)


# ---------------------------------------------------------------- references (float64, plain python)


def _softmax(z):
    m = max(z)
    e = [math.exp(x - m) for x in z]
    return [x / sum(e) for x in e]


def kl_rows(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def ref_buckets(s, topk, tau):
    """Per row, (q, p) over the K kept tokens and the tail, as lists."""
    out = []
    for r in range(s.shape[0]):
        ids = topk.ids[r].tolist()
        q_full = _softmax((s[r, :topk.vocab].double() / tau).tolist())
        q = [q_full[i] for i in ids]
        z, lse = topk.logits[r].double().tolist(), topk.lse[r].item()
        kept = [math.exp(x - lse) for x in z]
        if tau == 1.0:
            p = kept + [1.0 - sum(kept)]
        else:  # the tail as V − K tokens of equal logit carrying its mass at τ = 1
            n = topk.vocab - len(ids)
            tail = [(lse + math.log((1.0 - sum(kept)) / n)) / tau] * n
            p = _softmax([x / tau for x in z] + tail)
            p = p[:len(z)] + [sum(p[len(z):])]
        out.append((q + [1.0 - sum(q)], p))
    return out


def _taid_target(q, p, lam):
    w = [b ** (1 - lam) * a**lam for a, b in zip(p, q)]
    return [x / sum(w) for x in w]


def ref_bucket_div(kind, q, p, beta, alpha, lam):
    return ref_div(kind, q, p, beta, alpha, _taid_target(q, p, lam))


def ref_loss(kind, s, topk, tau, beta=0.5, alpha=0.1, lam=0.0):
    """τ² · the divergence per row over the buckets."""
    rows = [tau**2 * ref_bucket_div(kind, q, p, beta, alpha, lam) for q, p in ref_buckets(s, topk, tau)]
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_every_token_kept_is_the_dense_divergence(kind, tau):
    s, t, topk = make(0, k=V)
    s_dense, s_sparse = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    dense = scaled_divergence(s_dense, t, kind, tau, **PARAMS)
    sparse = scaled_divergence(s_sparse, topk, kind, tau, **PARAMS)
    assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    dense.sum().backward()
    sparse.sum().backward()
    assert_close(s_sparse.grad, s_dense.grad, rtol=1e-10, atol=1e-12)


def test_bucket_shapes_and_normalization():
    s = make(1)[0]
    for k, b in [(K, K + 1), (V, V)]:
        _, _, topk = make(1, k=k)
        log_q, log_p = bucket_log_probs(s, topk, 2.0)
        assert log_q.shape == log_p.shape == (N, b)
        assert_close(log_q.exp().sum(-1), torch.ones(N, dtype=torch.float64))
        assert_close(log_p.exp().sum(-1), torch.ones(N, dtype=torch.float64))
    log_q, log_p = bucket_log_probs(s.float(), topk, 1.0)
    assert log_q.dtype == log_p.dtype == torch.float32


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_top_k_matches_bucket_reference(kind, tau):
    s, _, topk = make(2)
    got = scaled_divergence(s, topk, kind, tau, **PARAMS)
    assert got.shape == (N,) and got.dtype == torch.float64
    assert_close(got, ref_loss(kind, s, topk, tau, **PARAMS), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", [k for k in DIVERGENCES if k != "taid"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_gradcheck(kind, tau):
    s, _, topk = make(3, n=3, v=7, k=3)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: scaled_divergence(x, topk, kind, tau, **PARAMS), (s,))


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_taid_gradient_holds_its_target_fixed(tau):
    """TAID's target is stop-gradient in the student (so gradcheck does not apply): its gradient is that of
    KL(r ‖ q) with r held at the current student, here by central differences of the reference."""
    s, _, topk = make(3, n=3, v=7, k=3)
    lam = PARAMS["lam"]
    targets = [_taid_target(q, p, lam) for q, p in ref_buckets(s, topk, tau)]

    def value(x):
        return sum(tau**2 * kl_rows(r, q) for r, (q, _) in zip(targets, ref_buckets(x, topk, tau)))

    eps, numeric = 1e-6, torch.zeros_like(s)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            step = torch.zeros_like(s)
            step[i, j] = eps
            numeric[i, j] = (value(s + step) - value(s - step)) / (2 * eps)
    x = s.clone().requires_grad_(True)
    scaled_divergence(x, topk, "taid", tau, lam=lam).sum().backward()
    assert_close(x.grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_gradient_reaches_student_only(kind):
    s, _, topk = make(4)
    s = s.float().requires_grad_(True)
    topk.logits.requires_grad_(True)
    topk.lse.requires_grad_(True)
    scaled_divergence(s, topk, kind, 2.0, **PARAMS).sum().backward()
    assert topk.logits.grad is None and topk.lse.grad is None
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-2), (torch.bfloat16, 1e-1)])
def test_half_precision_cache(kind, dtype, tol):
    """Loose: the tail is 1 minus the kept mass, so rounding the kept logits moves a small tail a lot."""
    s, _, topk = make(5)
    half = TopK(topk.ids, topk.logits.to(dtype), topk.lse.float(), V)
    got = scaled_divergence(s.float(), half, kind, 2.0, **PARAMS)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert_close(got.double(), scaled_divergence(s, topk, kind, 2.0, **PARAMS), rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kept_mass_of_one_stays_finite(kind, dtype):
    s, t, _ = make(6)
    t[:, 0] = 100.0  # all the mass on one kept token
    ids = t.topk(K, dim=-1).indices
    lse = t.logsumexp(dim=-1)
    lse[1] -= 1e-3  # rounding put the kept mass above 1
    for topk in (TopK(ids, t.gather(-1, ids), lse, V), TopK(ids, t.gather(-1, ids).half(), lse.float(), V)):
        x = s.to(dtype).requires_grad_(True)
        for tau in (1.0, 2.0):
            loss = scaled_divergence(x, topk, kind, tau, **PARAMS)
            (grad,) = torch.autograd.grad(loss.sum(), x)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (kind, tau)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_student_vocabulary_padding_ignored(kind):
    s, _, topk = make(7)
    padded = torch.cat([s, torch.full((N, 5), 1e4, dtype=s.dtype)], dim=-1)
    assert_close(scaled_divergence(padded, topk, kind, 2.0, **PARAMS), scaled_divergence(s, topk, kind, 2.0, **PARAMS),
                 rtol=1e-12, atol=1e-12)
    with pytest.raises(DistillError, match="smaller than the teacher cache"):
        scaled_divergence(s[:, :-1], topk, kind)


def test_chunks_sum_to_the_whole():
    s, _, topk = make(8, n=7)
    whole = scaled_divergence(s, topk, "jsd", 2.0, beta=0.3).sum()
    chunks = [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert topk[chunks[0]].k == K and topk[chunks[0]].vocab == V
    assert_close(sum(scaled_divergence(s[r], topk[r], "jsd", 2.0, beta=0.3).sum() for r in chunks), whole)


def test_through_the_fused_head_pass():
    """A student head padded past the cache's vocabulary, several chunks: total and gradients equal autograd
    over all logits at once."""
    n, d = 7, 6
    _, _, topk = make(9, n=n)
    torch.manual_seed(0)
    head = torch.nn.Linear(d, V + 3, bias=False, dtype=torch.float64)
    h = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    budget = 2 * row_bytes([V + 3, V], torch.device("cpu")) / 2**20  # two rows per chunk
    fn = lambda s, t, rows: scaled_divergence(s, topk[rows], "forward_kl", 2.0)
    total, values = head_pass(Side(h, Head(head)), None, [RowSum(fn, 1.0)], budget_mib=budget)
    total.backward()
    grad_h, grad_w = h.grad.clone(), head.weight.grad.clone()
    h.grad, head.weight.grad = None, None
    plain = scaled_divergence(h @ head.weight.T, topk, "forward_kl", 2.0).sum()
    plain.backward()
    assert_close(total, plain, rtol=1e-12, atol=1e-12)
    assert_close(values[0], plain.detach())
    assert_close(grad_h, h.grad, rtol=1e-10, atol=1e-12)
    assert_close(grad_w, head.weight.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_zero_probability_gives_no_nan_gradient(kind):
    """``kl_rows``'s 0·log 0 terms: a banned student token (-inf logit) gives a finite gradient, dense or sparse
    (nonzero only for forward KL, whose value is then rightly infinite)."""
    s, t, topk = make(10)
    s[:, -1] = float("-inf")
    for teacher in (t, topk):
        x = s.clone().requires_grad_(True)
        scaled_divergence(x, teacher, kind, 2.0, **PARAMS).sum().backward()
        assert torch.isfinite(x.grad).all(), kind


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_a_stored_tail_keeps_the_kept_and_tail_mass_of_the_unrounded_logits(tau):
    """With the cache's fp32 log tail mass, fp16-rounded kept logits move only the kept tokens' shares:
    at τ = 1 the tail bucket is exactly the stored mass and the kept mass one minus it; the result is the
    full-precision one up to that rounding, and closer than without the stored tail."""
    s, t, full = make(21, scale=4.0)
    log_tail = t.scatter(-1, full.ids, float("-inf")).logsumexp(-1) - full.lse
    rounded = TopK(full.ids, full.logits.half(), full.lse, V)
    stored = TopK(full.ids, full.logits.half(), full.lse, V, log_tail)
    if tau == 1.0:
        p = bucket_log_probs(s, stored, 1.0)[1].exp()
        assert_close(p[:, -1], log_tail.exp(), rtol=1e-12, atol=1e-15)
        assert_close(p[:, :-1].sum(-1), 1 - log_tail.exp(), rtol=1e-12, atol=1e-15)
    for kind in DIVERGENCES:
        exact = scaled_divergence(s, full, kind, tau, **PARAMS)
        with_tail = scaled_divergence(s, stored, kind, tau, **PARAMS)
        without = scaled_divergence(s, rounded, kind, tau, **PARAMS)
        assert_close(with_tail, exact, rtol=5e-3, atol=1e-4)
        assert (with_tail - exact).abs().sum() <= (without - exact).abs().sum() + 1e-12, kind
    assert_close(TopK(full.ids, full.logits, full.lse, V, log_tail)[1:3].log_tail, log_tail[1:3])
