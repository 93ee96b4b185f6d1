"""The pure parts of benchmarks/docstring_corpus.py and benchmarks/quality.py (their runs are in BENCHMARKS.md)."""

import argparse
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import docstring_corpus as dc  # noqa: E402
from benchmarks.common import Stages  # noqa: E402
from benchmarks.quality import (distinct_share, gap_lines, paired_gaps, per_example_scores,  # noqa: E402
                                ranking)

DOC = '''Compute the running mean of a stream of numbers.

The mean is updated in place for every new value, so that memory stays constant whatever the length of
the stream; this matters when the stream comes from a sensor that never stops sending readings.

Args:
    values: the numbers.

>>> running_mean([1, 2])
'''


def test_a_docstring_becomes_its_summary_and_prose_body():
    summary, body = dc.summary_and_body(DOC, (4, 30), (10, 300))
    assert summary == "Compute the running mean of a stream of numbers."
    assert body.startswith("The mean is updated in place") and "Args" not in body and ">>>" not in body
    assert dc.summary_and_body(DOC, (4, 30), (100, 300)) is None  # body too short
    assert dc.summary_and_body("One line only.", (1, 30), (1, 300)) is None
    assert dc.summary_and_body(":param x: the value.\n\nSome words here to read.", (1, 30), (1, 300)) is None


def test_the_corpus_splits_whole_units_and_keeps_a_docstring_once(tmp_path):
    site = tmp_path / "site"
    for pkg in ("alpha", "beta", "gamma", "delta", "epsilon"):
        for mod in ("core", "extra"):
            path = site / pkg / mod / "__init__.py"
            path.parent.mkdir(parents=True)
            path.write_text(f'def f():\n    """{DOC.replace("numbers", pkg + " " + mod + " numbers")}"""\n'
                            f'def g():\n    """{DOC}"""\n')
    (site / "alpha" / "tests").mkdir()
    (site / "alpha" / "tests" / "test_x.py").write_text(f'def t():\n    """{DOC.replace("mean", "median")}"""\n')
    stats = dc.build([site], tmp_path / "out", (4, 30), (10, 300))
    rows = {s: [json.loads(line) for line in (tmp_path / "out" / f"{s}.jsonl").read_text().splitlines()]
            for s in dc.SPLITS}
    assert sum(stats["examples"].values()) == 11  # 10 units' own docstrings and the shared one, once; no tests
    units = {s: {r["unit"] for r in rs} for s, rs in rows.items()}
    assert all(not (units[a] & units[b]) for a in units for b in units if a < b)
    assert all(dc.split_of(r["unit"]) == s for s, rs in rows.items() for r in rs)
    assert not any("median" in r["document"] + r["summary"] for rs in rows.values() for r in rs)
    names = {r["document"].splitlines()[0] for rs in rows.values() for r in rs}
    assert {"alpha.core.f", "alpha.core.g", "beta.extra.f"} <= names  # the qualified name heads the source


def test_qualified_names_follow_classes_and_nested_scopes(tmp_path):
    path = tmp_path / "pkg" / "mod.py"
    path.parent.mkdir()
    path.write_text('"""Module."""\nclass A:\n    """A."""\n    if True:\n        def m(self):\n'
                    '            """M."""\n            def inner():\n                """Inner."""\n')
    assert list(dc.docstrings(path, dc.module_name(path, tmp_path))) == [
        ("pkg.mod", "Module."), ("pkg.mod.A", "A."), ("pkg.mod.A.m", "M."), ("pkg.mod.A.m.inner", "Inner.")]
    assert dc.module_name(tmp_path / "pkg" / "__init__.py", tmp_path) == "pkg"


def _row(r2, low, high):
    return {"rouge2": r2, "rouge2_low": low, "rouge2_high": high}


def test_ranking_says_which_intervals_separate_the_best_method():
    rows = {"teacher": _row(20, 19, 21), "KD (3-layer decoder)": _row(15, 14, 16), "SFT (3-layer decoder)": _row(12, 11, 13),
            "PL (3-layer decoder)": _row(14.5, 13.5, 15.5), "KD (1-layer decoder)": _row(9, 8, 10), "SFT (1-layer decoder)": _row(10, 9, 11)}
    lines = ranking(rows)
    assert lines == [
        "- Students with a 1-layer decoder: SFT has the best ROUGE-2 (10.00); its 95% interval is above none of the others, "
        "and overlaps KD.",
        "- Students with a 3-layer decoder: KD has the best ROUGE-2 (15.00); its 95% interval is above SFT, and overlaps PL."]


def _scores(rouge2):
    return [{"rouge1": 2 * r, "rouge2": r, "rougeL": 1.5 * r} for r in rouge2]


def test_paired_gaps_separate_a_constant_gain_that_the_own_intervals_cannot():
    hard_and_easy = [0.0, 40.0] * 50  # examples' difficulty dominates each model's own interval
    swing = [0.5, -0.5] * 50
    scores = {"SFT (2-layer decoder)": _scores(hard_and_easy),
              "KD (2-layer decoder)": _scores([r + 1 for r in hard_and_easy]),
              "PL (2-layer decoder)": _scores([r + d for r, d in zip(hard_and_easy, swing)]),
              "KD (1-layer decoder)": _scores([r - 2 for r in hard_and_easy]),
              "SFT (1-layer decoder)": _scores(hard_and_easy)}
    gaps = paired_gaps(scores, "SFT", samples=500)
    assert set(gaps) == {"KD (2-layer decoder)", "PL (2-layer decoder)", "KD (1-layer decoder)"}  # same depth only
    assert gaps["KD (2-layer decoder)"]["rouge2"] == {"low": 1.0, "mid": 1.0, "high": 1.0}
    assert gaps["KD (2-layer decoder)"]["rouge1"]["mid"] == 2.0
    assert gaps["PL (2-layer decoder)"]["rouge2"]["low"] < 0 < gaps["PL (2-layer decoder)"]["rouge2"]["high"]
    assert gap_lines(gaps, "SFT") == [
        "- KD (2-layer decoder): ROUGE-2 +1.00 [+1.00, +1.00] against SFT: better than SFT.",
        f"- PL (2-layer decoder): ROUGE-2 {gaps['PL (2-layer decoder)']['rouge2']['mid']:+.2f} "
        f"[{gaps['PL (2-layer decoder)']['rouge2']['low']:+.2f}, {gaps['PL (2-layer decoder)']['rouge2']['high']:+.2f}] "
        "against SFT: not separable from SFT.",
        "- KD (1-layer decoder): ROUGE-2 -2.00 [-2.00, -2.00] against SFT: worse than SFT."]


def test_per_example_scores_pair_predictions_with_their_references_by_id(tmp_path):
    data, results = tmp_path / "data", tmp_path / "eval"
    data.mkdir(), results.mkdir()
    refs = ["the cat sat on the mat", "a dog ran in the park", "rain fell all day long"]
    (data / "test.jsonl").write_text("".join(json.dumps({"document": "x", "summary": r}) + "\n" for r in refs))
    # predictions in the order ranks wrote them, not the examples' order
    (results / "kd-d2.jsonl").write_text("".join(json.dumps({"id": i, "prediction": refs[i]}) + "\n" for i in (2, 0, 1)))
    a = argparse.Namespace(source_column="document", target_column="summary", test_samples=2)
    scores = per_example_scores(results, {"KD (2-layer decoder)": "kd-d2"}, data, a)
    assert [s["rouge2"] for s in scores["KD (2-layer decoder)"]] == [100.0, 100.0]  # the first 2 examples, each matched


def test_distinct_share_flags_a_model_that_writes_one_summary_for_every_source(tmp_path):
    path = tmp_path / "teacher-check.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prediction": "Return the object." if i else "Sum two numbers."}) + "\n"
                            for i in range(4)))
    assert distinct_share(path) == 0.5


def test_a_finished_stage_is_reused_only_with_the_same_settings(tmp_path, capsys):
    st, marker = Stages(tmp_path, 1, "quality"), tmp_path / "out" / "done.json"

    def make(steps, port):
        code = f"import pathlib; p = pathlib.Path({str(marker)!r}); p.parent.mkdir(exist_ok=True); p.write_text('{steps}')"
        return [sys.executable, "-c", code, "--master_port", port]

    st.run(marker, make(10, 1234), "stage")
    st.run(marker, make(10, 5678), "stage")  # another port is the same settings: skipped
    assert "stage: done" in capsys.readouterr().out and marker.read_text() == "10"
    with pytest.raises(SystemExit, match="stage in .* was made with other settings"):
        st.run(marker, make(20, 1234), "stage")
    assert marker.read_text() == "10"
