"""The task metrics and the interval over seeds, as small pure functions of plain Python lists.

Matthews correlation is the multi-class form of Gorodkin (2004), which equals the binary MCC on two classes."""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence


def accuracy(gold: Sequence, predicted: Sequence) -> float:
    return sum(g == p for g, p in zip(gold, predicted)) / len(gold)


def macro_f1(gold: Sequence, predicted: Sequence) -> float:
    """The unweighted mean of each gold or predicted class's F1 (a class never predicted nor seen scores 0)."""
    scores = []
    for c in sorted(set(gold) | set(predicted), key=repr):
        tp = sum(g == c and p == c for g, p in zip(gold, predicted))
        fp = sum(g != c and p == c for g, p in zip(gold, predicted))
        fn = sum(g == c and p != c for g, p in zip(gold, predicted))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def matthews(gold: Sequence, predicted: Sequence) -> float:
    """Matthews correlation; 0 when either side is constant (its denominator is 0)."""
    n = len(gold)
    correct = sum(g == p for g, p in zip(gold, predicted))
    true, pred = Counter(gold), Counter(predicted)
    classes = set(true) | set(pred)
    cov = correct * n - sum(true[c] * pred[c] for c in classes)
    denom = math.sqrt((n * n - sum(v * v for v in pred.values())) * (n * n - sum(v * v for v in true.values())))
    return cov / denom if denom else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r; 0 when either side is constant."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else 0.0


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            out[i] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(ranks(x), ranks(y))


CLASSIFICATION = {"accuracy": accuracy, "macro_f1": macro_f1, "matthews": matthews}
REGRESSION = {"pearson": pearson, "spearman": spearman}


def task_metrics(regression: bool, gold: Sequence, predicted: Sequence) -> dict[str, float]:
    return {name: fn(gold, predicted) for name, fn in (REGRESSION if regression else CLASSIFICATION).items()}


def _t_density(x: float, df: int) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: int, steps: int = 4000) -> float:
    """Student-t CDF at ``x >= 0``: 1/2 plus the density's integral from 0 (Simpson's rule)."""
    h = x / steps
    total = _t_density(0.0, df) + _t_density(x, df)
    total += sum((4 if i % 2 else 2) * _t_density(i * h, df) for i in range(1, steps))
    return 0.5 + total * h / 3


def t_quantile(p: float, df: int) -> float:
    """The Student-t quantile for ``p`` in (0.5, 1), by bisection on ``t_cdf``."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def t_interval(values: Sequence[float], level: float = 0.95) -> dict[str, float | None]:
    """The mean and its two-sided Student-t interval, mean ± t(1 - (1 - level)/2, n - 1) · s / √n
    (s the sample standard deviation); no interval for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(1 - (1 - level) / 2, n - 1) * s / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}
