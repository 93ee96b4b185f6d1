"""ROUGE evaluation: hand-checked scores, the offline sentence splitter, the bootstrap, the table."""

import numpy as np
import pytest

from distill.errors import DistillError
from distill.infer.evaluate import ROUGE_TYPES, bootstrap, markdown_table, rouge, rouge_scores, split_sentences

# rouge-score tokenises by lowercasing and splitting on non-alphanumerics; with the stemmer on, only
# tokens longer than 3 characters are stemmed (so "cat", "sat", "mat", "ran" stay as they are).
# F = 2PR / (P + R); scores are F x 100.


def f1(p: float, r: float) -> float:
    return 100 * 2 * p * r / (p + r)


def test_cat_on_the_mat_by_hand():
    # pred: the cat sat on the mat (6 tokens); ref: the cat is on the mat (6 tokens)
    # unigrams: the 2 (clipped to 2), cat 1, on 1, mat 1 -> 5 hits; P = 5/6, R = 5/6, F = 83.33
    # bigrams pred: the-cat cat-sat sat-on on-the the-mat; ref: the-cat cat-is is-on on-the the-mat
    #   hits: the-cat on-the the-mat = 3; P = 3/5, R = 3/5, F = 60
    # LCS: the cat on the mat = 5; P = 5/6, R = 5/6, F = 83.33 (one sentence each, so Lsum = L)
    [s] = rouge_scores(["the cat sat on the mat"], ["the cat is on the mat"])
    assert s["rouge1"] == pytest.approx(f1(5 / 6, 5 / 6), abs=1e-6)
    assert s["rouge2"] == pytest.approx(60.0, abs=1e-6)
    assert s["rougeL"] == pytest.approx(f1(5 / 6, 5 / 6), abs=1e-6)
    assert s["rougeLsum"] == pytest.approx(f1(5 / 6, 5 / 6), abs=1e-6)


def test_unequal_lengths_by_hand():
    # pred: the quick brown fox (4 tokens); ref: a quick brown dog jumps -> a quick brown dog jump (5)
    # unigrams: quick brown -> 2 hits; P = 2/4, R = 2/5, F = 44.44
    # bigrams pred: the-quick quick-brown brown-fox (3); ref: a-quick quick-brown brown-dog dog-jump (4)
    #   hits: quick-brown = 1; P = 1/3, R = 1/4, F = 2/7 = 28.57
    # LCS: quick brown = 2; P = 2/4, R = 2/5, F = 44.44
    [s] = rouge_scores(["the quick brown fox"], ["a quick brown dog jumps"])
    assert s["rouge1"] == pytest.approx(f1(2 / 4, 2 / 5), abs=1e-6)
    assert s["rouge2"] == pytest.approx(f1(1 / 3, 1 / 4), abs=1e-6)
    assert s["rouge2"] == pytest.approx(100 * 2 / 7, abs=1e-6)
    assert s["rougeL"] == pytest.approx(f1(2 / 4, 2 / 5), abs=1e-6)


def test_word_order_lowers_rouge_l_not_rouge_1():
    # pred: the man bit the dog; ref: the dog bit the man (5 tokens each)
    # unigrams: the 2, man, bit, dog -> 5 hits; F = 100
    # bigrams pred: the-man man-bit bit-the the-dog; ref: the-dog dog-bit bit-the the-man
    #   hits: the-man bit-the the-dog = 3 of 4; F = 75
    # LCS: "the bit the" = 3 (no common token fits between "the" and "bit", nor after "bit the");
    #   P = R = 3/5, F = 60
    [s] = rouge_scores(["the man bit the dog"], ["the dog bit the man"])
    assert s["rouge1"] == pytest.approx(100.0, abs=1e-6)
    assert s["rouge2"] == pytest.approx(75.0, abs=1e-6)
    assert s["rougeL"] == pytest.approx(60.0, abs=1e-6)


def test_stemming():
    # Porter: running -> run, dogs -> dog ("run" and "dog" are 3 characters, left as they are)
    [s] = rouge_scores(["running dogs"], ["run dog"])
    assert s == pytest.approx({t: 100.0 for t in ROUGE_TYPES}, abs=1e-6)


def test_lsum_uses_sentence_boundaries():
    # pred: "The cat sat. The dog ran."  ref: "The dog ran. The cat sat."
    # As one sequence each: the cat sat the dog ran / the dog ran the cat sat.
    #   LCS = 3 ("the cat sat" or "the dog ran"; no 4th common token fits): rougeL F = 3/6 = 50.
    #   bigrams: the-cat cat-sat the-dog dog-ran hit, sat-the / ran-the do not: 4/5 -> rouge2 = 80.
    # Lsum, sentence by sentence: each reference sentence is matched in full by the union of its LCS
    #   with the prediction's sentences (the dog ran: 3; the cat sat: 3) -> 6 hits of 6 tokens on
    #   each side: P = R = 1, rougeLsum = 100. Without the sentence split it would equal rougeL (50).
    [s] = rouge_scores(["The cat sat. The dog ran."], ["The dog ran. The cat sat."])
    assert s["rouge1"] == pytest.approx(100.0, abs=1e-6)
    assert s["rouge2"] == pytest.approx(80.0, abs=1e-6)
    assert s["rougeL"] == pytest.approx(50.0, abs=1e-6)
    assert s["rougeLsum"] == pytest.approx(100.0, abs=1e-6)


def test_lsum_reads_existing_newlines_too():
    [s] = rouge_scores(["the cat sat\nthe dog ran"], ["the dog ran\nthe cat sat"])
    assert s["rougeL"] == pytest.approx(50.0, abs=1e-6)
    assert s["rougeLsum"] == pytest.approx(100.0, abs=1e-6)


def test_rouge_scores_one_dict_per_example_in_order():
    scores = rouge_scores(["running dogs", "a b", ""], ["run dog", "c d", "x"])
    assert [s["rouge1"] for s in scores] == pytest.approx([100.0, 0.0, 0.0])
    assert all(list(s) == list(ROUGE_TYPES) for s in scores)


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "Mr. Smith went to Washington. He arrived at 3 p.m. on Monday.",
            ["Mr. Smith went to Washington.", "He arrived at 3 p.m. on Monday."],
        ),
        ("Revenue rose to $3.5 million. Costs fell 2.1%.", ["Revenue rose to $3.5 million.", "Costs fell 2.1%."]),
        (
            "The U.S. Army and the U.K. agreed, e.g. Dr. J. Doe said so. It ended.",
            ["The U.S. Army and the U.K. agreed, e.g. Dr. J. Doe said so.", "It ended."],
        ),
        ("Mrs. Jones, i.e. Her Honour, spoke.", ["Mrs. Jones, i.e. Her Honour, spoke."]),
        ('"Stop!" she said. "Why?" He asked.', ['"Stop!" she said.', '"Why?"', "He asked."]),
        ("He said \u201cno.\u201d Then he left.", ["He said \u201cno.\u201d", "Then he left."]),
        ("(See below.) Next one. [Note.] Done.", ["(See below.)", "Next one.", "[Note.]", "Done."]),
        ("Wait... What? Yes! 2019 was worse.", ["Wait...", "What?", "Yes!", "2019 was worse."]),
        ("First line\nSecond line. Third one.\n\n  \n", ["First line", "Second line.", "Third one."]),
        ("no capital. after the stop", ["no capital. after the stop"]),
        ("  padded sentence.  ", ["padded sentence."]),
        ("", []),
        (" \n\t ", []),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def test_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(3)
    per_example = [{"rouge1": float(x), "rouge2": float(y)} for x, y in rng.random((200, 2)) * 100]
    a = bootstrap(per_example, samples=200, seed=7)
    assert a == bootstrap(per_example, samples=200, seed=7)
    assert a != bootstrap(per_example, samples=200, seed=8)
    assert set(a) == {"rouge1", "rouge2"}


def test_bootstrap_of_identical_scores_is_that_score():
    result = bootstrap([{"rouge1": 42.25, "rougeL": 10.5}] * 50, samples=100)
    assert result == {
        "rouge1": {"low": 42.25, "mid": 42.25, "high": 42.25},
        "rougeL": {"low": 10.5, "mid": 10.5, "high": 10.5},
    }


def test_bootstrap_percentiles_on_a_discrete_case():
    # Two examples scoring 0 and 100: a resample's mean is 0, 50 or 100 with probability 1/4, 1/2,
    # 1/4, so the 2.5th, 50th and 97.5th percentiles of 1000 resampled means are 0, 50 and 100,
    # while the 30th and 70th (confidence 0.4) are both 50.
    per_example = [{"rouge2": 0.0}, {"rouge2": 100.0}]
    assert bootstrap(per_example, seed=5)["rouge2"] == {"low": 0.0, "mid": 50.0, "high": 100.0}
    assert bootstrap(per_example, seed=5, confidence=0.4)["rouge2"] == {"low": 50.0, "mid": 50.0, "high": 50.0}


def test_bootstrap_mid_is_the_mean_and_interval_the_standard_error():
    values = np.random.default_rng(0).random(5000) * 100
    result = bootstrap([{"rouge1": float(v)} for v in values], samples=1000, seed=1)["rouge1"]
    assert result["low"] < result["mid"] < result["high"]
    assert result["mid"] == pytest.approx(values.mean(), abs=0.1)
    # A 95% interval of a mean spans about 2 x 1.96 standard errors.
    standard_error = values.std() / np.sqrt(len(values))
    assert result["high"] - result["low"] == pytest.approx(2 * 1.96 * standard_error, rel=0.15)
    narrow = bootstrap([{"rouge1": float(v)} for v in values], samples=1000, seed=1, confidence=0.5)["rouge1"]
    assert result["low"] < narrow["low"] < narrow["mid"] < narrow["high"] < result["high"]


def test_bootstrap_is_fast_on_10k_examples():
    import time

    values = np.random.default_rng(0).random((10_000, 4)) * 100
    per_example = [dict(zip(ROUGE_TYPES, map(float, row))) for row in values]
    start = time.perf_counter()
    result = bootstrap(per_example, samples=1000)
    assert time.perf_counter() - start < 1.0
    for j, t in enumerate(ROUGE_TYPES):
        assert result[t]["low"] <= result[t]["mid"] <= result[t]["high"]
        assert result[t]["mid"] == pytest.approx(values[:, j].mean(), abs=0.1)


def test_rouge_flat_dict():
    result = rouge(["the cat sat on the mat", "running dogs"], ["the cat is on the mat", "run dog"], samples=50)
    expected_keys = [k for t in ROUGE_TYPES for k in (t, f"{t}_low", f"{t}_high")] + ["n"]
    assert list(result) == expected_keys
    assert result["n"] == 2 and isinstance(result["n"], int)
    for t in ROUGE_TYPES:
        assert result[f"{t}_low"] <= result[t] <= result[f"{t}_high"]
    # Two examples: every resample mean is one of (a+a)/2, (a+b)/2, (b+b)/2, all within [a, b].
    assert 60.0 <= result["rouge2"] <= 100.0
    assert 5 / 6 * 100 - 1e-9 <= result["rouge1"] <= 100.0


def test_rouge_single_example_equals_its_score():
    result = rouge(["the man bit the dog"], ["the dog bit the man"], samples=10)
    assert (result["rougeL"], result["rougeL_low"], result["rougeL_high"]) == pytest.approx((60.0, 60.0, 60.0))


def _one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(DistillError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_mismatched_lengths_name_both():
    message = _one_line_error(rouge_scores, ["a", "b", "c"], ["a", "b"])
    assert "3" in message and "2" in message
    _one_line_error(rouge, ["a"], [])


def test_non_string_text_is_rejected():
    assert "references[1]" in _one_line_error(rouge_scores, ["a", "b"], ["a", None])


def test_empty_input():
    assert rouge_scores([], []) == []
    _one_line_error(bootstrap, [])
    _one_line_error(rouge, [], [])


@pytest.mark.parametrize(
    "kwargs",
    [{"samples": 0}, {"samples": 2.5}, {"confidence": 1.0}, {"confidence": 0.0}],
)
def test_bad_bootstrap_settings(kwargs):
    _one_line_error(bootstrap, [{"rouge1": 1.0}], **kwargs)


def test_bootstrap_rejects_inconsistent_keys():
    _one_line_error(bootstrap, [{"rouge1": 1.0}, {"rouge2": 1.0}])


def test_markdown_table():
    rows = {
        "bart-large-xsum": {"rouge2": 21.854, "rougeL": 36.5, "n": 11334},
        "distilbart-12-6": {"rouge2": 22.123, "rougeL": 36.994, "n": 11334},
        "sft": {"rouge2": 20.0},
    }
    assert markdown_table(rows, ["rouge2", "rougeL", "n"]) == (
        "| model | rouge2 | rougeL | n |\n"
        "|---|---:|---:|---:|\n"
        "| bart-large-xsum | 21.85 | 36.50 | 11334 |\n"
        "| distilbart-12-6 | 22.12 | 36.99 | 11334 |\n"
        "| sft | 20.00 | - | - |\n"
    )
