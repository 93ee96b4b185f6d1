"""The schedules over optimizer steps (loss weights, learning rate) and TAID's λ, which lives on the
device: its adaptive mode against the float64 recurrence it implements, state across a resume."""

import math

import pytest
import torch

from distill.errors import DistillError
from distill.losses.schedules import lr_multiplier, schedule_value
from distill.losses.taid import TaidLambda


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_endpoints_and_clamp(kind):
    assert schedule_value(kind, 0.2, 1.0, 0, 100) == pytest.approx(0.2)
    assert schedule_value(kind, 0.2, 1.0, 100, 100) == pytest.approx(1.0)
    assert schedule_value(kind, 0.2, 1.0, 500, 100) == pytest.approx(1.0)
    assert schedule_value(kind, 0.2, 1.0, -5, 100) == pytest.approx(0.2)
    assert schedule_value(kind, 0.2, 1.0, 50, 100) == pytest.approx(0.6)  # both pass the midpoint
    assert schedule_value(kind, 1.0, 0.0, 100, 100) == pytest.approx(0.0)  # decay works too
    vals = [schedule_value(kind, 0.2, 1.0, i, 100) for i in range(101)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))


def test_schedule_constant_and_bad_kind():
    assert schedule_value("constant", 0.3, 1.0, 70, 100) == 0.3
    assert schedule_value("cosine", 0.2, 1.0, 25, 100) == pytest.approx(0.2 + 0.8 * (1 - math.cos(math.pi / 4)) / 2)
    with pytest.raises(DistillError):
        schedule_value("exp", 0, 1, 0, 10)


# ---------------------------------------------------------------- TAID λ


def _losses(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a loss that falls fast, then plateaus, with noise and a spike
    out = [5.0 * math.exp(-i / 20) + 0.5 + 0.05 * torch.rand(1, generator=g).item() for i in range(n)]
    out[n // 2] = 50.0
    return out


def _run(lam, losses, first_step=1):
    """λ after each update, as python floats (read back here, in the test, not by the update)."""
    return [lam.update(i, torch.tensor(x, dtype=torch.float64)).item() for i, x in enumerate(losses, start=first_step)]


def test_taid_lambda_constant_and_linear():
    c = TaidLambda(0.3, 1.0, mode="constant")
    for i in range(1, 10):
        c.update(i)
    assert c.value.item() == 0.3
    lin = TaidLambda(0.1, 1.0, 100, mode="linear")
    assert lin.value.item() == 0.1 and not lin.adaptive
    vals = [lin.update(i).item() for i in range(1, 151)]  # no loss needed
    assert vals[49] == pytest.approx(0.55) and vals[99] == pytest.approx(1.0) and vals[-1] == 1.0
    assert all(a <= b for a, b in zip(vals, vals[1:]))


def test_taid_lambda_adaptive_monotone_bounded_above_linear():
    lam = TaidLambda(0.1, 0.9, 200, mode="adaptive", adaptive_rate=0.01)
    vals = _run(lam, _losses(300))
    assert all(a <= b for a, b in zip(vals, vals[1:]))
    assert all(v <= 0.9 for v in vals) and vals[-1] == pytest.approx(0.9)
    assert all(v >= schedule_value("linear", 0.1, 0.9, i, 200) - 1e-12 for i, v in enumerate(vals, start=1))
    lam.update(301, torch.tensor(float("nan")))  # a bad step never breaks λ
    assert torch.isfinite(lam.value)
    with pytest.raises(ValueError, match="needs each step's distillation loss"):
        lam.update(302)


def test_taid_lambda_adaptive_matches_the_float64_recurrence():
    """Alg. 1 written out in python floats: the device-side update follows it to rounding."""
    start, end, total, momentum, rate, eps = 0.1, 1.0, 50, 0.9, 0.05, 1e-8
    losses = _losses(60, seed=2)
    losses[7] = float("inf")  # no evidence: δ = 0 and the previous loss is kept
    value, m, prev, expected = start, 0.0, None, []
    for n, loss in enumerate(losses, start=1):
        delta = 0.0
        if math.isfinite(loss):
            delta = 0.0 if prev is None else (prev - loss) / (abs(prev) + eps)
            prev = loss
        m = momentum * m + (1 - momentum) * delta
        grow = rate * (1 / (1 + math.exp(-m))) * (1 - value)
        value = min(end, max(schedule_value("linear", start, end, n, total), value + grow))
        expected.append(value)
    got = _run(TaidLambda(start, end, total, "adaptive", momentum=momentum, adaptive_rate=rate, eps=eps), losses)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_taid_lambda_adaptive_faster_when_loss_falls_fast():
    fast = TaidLambda(0.1, 1.0, 1000, mode="adaptive", adaptive_rate=0.01)
    flat = TaidLambda(0.1, 1.0, 1000, mode="adaptive", adaptive_rate=0.01)
    _run(fast, [10.0 * 0.9**i for i in range(1, 51)])
    _run(flat, [1.0] * 50)
    assert fast.value.item() > flat.value.item() > schedule_value("linear", 0.1, 1.0, 50, 1000)


def test_taid_lambda_state_dict_round_trip():
    losses = _losses(120, seed=1)
    expected = _run(TaidLambda(0.2, 1.0, 100, mode="adaptive", adaptive_rate=0.02), losses)
    first = TaidLambda(0.2, 1.0, 100, mode="adaptive", adaptive_rate=0.02)
    _run(first, losses[:60])
    resumed = TaidLambda(0.2, 1.0, 100, mode="adaptive", adaptive_rate=0.02)
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(resumed.value, first.value)
    assert _run(resumed, losses[60:], first_step=61) == expected[60:]  # exactly, not approximately


def test_taid_lambda_loads_the_float_state_of_older_checkpoints():
    old = {"value": 0.25, "step": 3, "m": 0.01, "prev_loss": None}
    first, later = TaidLambda(0.2, 1.0, 100, mode="adaptive"), TaidLambda(0.2, 1.0, 100, mode="adaptive")
    first.load_state_dict(old)  # saved before any finite loss
    later.load_state_dict({**old, "prev_loss": 4.0})
    assert first.value.item() == later.value.item() == 0.25 and first.value.dtype == torch.float64
    first.update(4, torch.tensor(2.0))  # no evidence yet: λ grows by the momentum alone
    later.update(4, torch.tensor(2.0))  # the loss halved since the saved step: λ grows faster
    assert later.value.item() > first.value.item() > 0.25
    assert later.state_dict()["prev_loss"].item() == 2.0


def test_taid_lambda_rejects_bad_config():
    with pytest.raises(DistillError):
        TaidLambda(0.1, 1.0, None, mode="linear")
    with pytest.raises(DistillError):
        TaidLambda(0.5, 0.2, 10)
    with pytest.raises(DistillError):
        TaidLambda(0.1, 1.0, 10, mode="cosine")


def test_lr_multiplier_warmup_then_decay():
    assert lr_multiplier("linear", 0, 4, 104, 0.0) == pytest.approx(0.25)
    assert lr_multiplier("linear", 3, 4, 104, 0.0) == pytest.approx(1.0)
    assert lr_multiplier("linear", 4, 4, 104, 0.0) == pytest.approx(1.0)
    assert lr_multiplier("linear", 54, 4, 104, 0.1) == pytest.approx(0.55)
    assert lr_multiplier("cosine", 104, 4, 104, 0.1) == pytest.approx(0.1)
    assert lr_multiplier("constant", 90, 0, 104, 0.1) == 1.0
