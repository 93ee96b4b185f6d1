"""Hidden-state layer maps (Shleifer & Rush 2020; Udagawa et al. 2023) on the published depths and the rule beyond
them."""

import pytest

from distill.errors import DistillError
from distill.models.layer_maps import hidden_pairs, layers_to_copy, resolve_layer


def test_udagawa_maps_for_a_12_layer_teacher_and_6_layer_student():
    # 1-based, k = 2: last φ(i) = 6 + i, uniform 2i, consecutive {2i-1, 2i}, uniform+last {2i, 6+i}
    assert hidden_pairs("last", 6, 12) == [(i, 6 + i) for i in range(1, 7)]
    assert hidden_pairs("uniform", 6, 12) == [(i, 2 * i) for i in range(1, 7)]
    assert hidden_pairs("uniform_consecutive", 6, 12) == [(i, j) for i in range(1, 7) for j in (2 * i - 1, 2 * i)]
    assert hidden_pairs("uniform_last", 6, 12) == [(i, j) for i in range(1, 7) for j in sorted({2 * i, 6 + i})]


def test_maps_when_depths_do_not_divide():
    # k = 24/9: each student layer still gets the teacher layer nearest k·i, the last one the last.
    pairs = hidden_pairs("uniform", 9, 24)
    assert [j for _, j in pairs] == [3, 5, 8, 11, 13, 16, 19, 21, 24]
    consecutive = hidden_pairs("uniform_consecutive", 9, 24)
    assert sorted(j for _, j in consecutive) == list(range(1, 25))  # every teacher layer exactly once


def test_copied_and_supervise_forward_maps_use_the_tables():
    # student layer i (hidden index i+1) against the teacher layer it came from (hidden index j+1)
    assert hidden_pairs("copied", 6, 12, copied=layers_to_copy(6, 12)) == [
        (1, 1), (2, 3), (3, 5), (4, 8), (5, 10), (6, 12)]
    assert hidden_pairs("supervise_forward", 3, 12) == [(1, 4), (2, 8), (3, 12)]
    assert hidden_pairs("custom", 2, 4, teacher_layers=[1, 3]) == [(1, 2), (2, 4)]


@pytest.mark.parametrize("kind, kwargs, message", [
    ("copied", {}, "needs a student made by layer copy"),
    ("copied", {"copied": [0, 12]}, "indexes past the teacher's 12 layers"),
    ("custom", {"teacher_layers": [0]}, "one teacher layer for each of the 2 student layers"),
    ("supervise_forward", {}, "no supervise-forward layer table"),
    ("nearest", {}, "unknown hidden map"),
])
def test_bad_maps(kind, kwargs, message):
    n_student = 5 if kind == "supervise_forward" else 2
    with pytest.raises(DistillError, match=message):
        hidden_pairs(kind, n_student, 12, **kwargs)


def test_resolve_layer():
    assert resolve_layer(-1, 12, "x") == 11 and resolve_layer(-2, 12, "x") == 10 and resolve_layer(0, 12, "x") == 0
    for bad in (12, -13):
        with pytest.raises(DistillError, match="indexes past the model's 12 layers"):
            resolve_layer(bad, 12, "x")
