"""``distill finetune``: its metrics and interval against hand-computed values, its refusals (one line, exit 2,
before any model loads), its recipes, and runs on tiny models (one process; two ranks under the launcher)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distill.cli import main
from distill.finetune import metrics
from distill.finetune.config import load_finetune_config
from distill.finetune.data import eval_shard, train_batches

ROOT = Path(__file__).parents[1]
FINETUNE_RECIPES = sorted((ROOT / "recipes").glob("finetune_*.yaml"))

# --- metrics, against values worked out by hand ---------------------------------------------------------

GOLD = [1, 1, 1, 0, 0, 2]
PRED = [1, 0, 1, 0, 2, 2]


def test_accuracy_and_macro_f1():
    assert metrics.accuracy(GOLD, PRED) == pytest.approx(4 / 6)
    # class 0: tp 1 fp 1 fn 1 -> 1/2; class 1: tp 2 fp 0 fn 1 -> 4/5; class 2: tp 1 fp 1 fn 0 -> 2/3
    assert metrics.macro_f1(GOLD, PRED) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)


def test_matthews_binary_and_multiclass():
    gold, pred = [1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1, 0]  # tp 2, fn 1, tn 3, fp 1
    assert metrics.matthews(gold, pred) == pytest.approx((2 * 3 - 1 * 1) / math.sqrt(3 * 3 * 4 * 4))
    # Gorodkin's form: c = 4 correct of n = 6; true counts (2, 3, 1), predicted counts (2, 2, 2)
    cov = 4 * 6 - (2 * 2 + 3 * 2 + 1 * 2)
    assert metrics.matthews(GOLD, PRED) == pytest.approx(cov / math.sqrt((36 - 12) * (36 - 14)))
    assert metrics.matthews([0, 1, 0], [1, 1, 1]) == 0.0  # a constant prediction


def test_pearson_and_spearman():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 4.0, 3.0]
    # means 2.5 and 2.5; deviations (-1.5, -.5, .5, 1.5) and (-.5, -1.5, 1.5, .5): sxy 3, sxx = syy 5
    assert metrics.pearson(x, y) == pytest.approx(3 / 5)
    assert metrics.ranks([10.0, 20.0, 20.0, 5.0]) == [2.0, 3.5, 3.5, 1.0]
    assert metrics.spearman([1.0, 2.0, 3.0], [1.0, 4.0, 9.0]) == pytest.approx(1.0)
    assert metrics.spearman([10.0, 20.0, 20.0, 5.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(
        metrics.pearson([2.0, 3.5, 3.5, 1.0], [1.0, 2.0, 3.0, 4.0]))
    assert metrics.pearson([1.0, 1.0], [1.0, 2.0]) == 0.0


def test_t_interval():
    # t(0.975, 1) = 12.7062, t(0.975, 2) = 4.3027, t(0.975, 4) = 2.7764 (published tables)
    for df, t in ((1, 12.7062047362), (2, 4.30265272975), (4, 2.77644510520), (30, 2.04227245630)):
        assert metrics.t_quantile(0.975, df) == pytest.approx(t, abs=1e-6)
    ci = metrics.t_interval([1.0, 2.0, 3.0])  # mean 2, s 1
    half = 4.30265272975 / math.sqrt(3)
    assert ci["mean"] == 2.0 and ci["n"] == 3
    assert (ci["low"], ci["high"]) == (pytest.approx(2 - half, abs=1e-6), pytest.approx(2 + half, abs=1e-6))
    assert metrics.t_interval([0.5]) == {"mean": 0.5, "low": None, "high": None, "n": 1}


# --- shards ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_each_example_once_with_the_same_global_batches(world):
    one = train_batches(10, 4, seed=3, epoch=1, rank=0, world=1)
    parts = [train_batches(10, 4, seed=3, epoch=1, rank=r, world=world) for r in range(world)]
    for b, batch in enumerate(one):
        rows = np.concatenate([p[b] for p in parts])
        assert sorted(rows[rows >= 0]) == sorted(batch) and len({len(p[b]) for p in parts}) == 1
    shards = [eval_shard(7, r, world) for r in range(world)]
    rows = np.concatenate(shards)
    assert sorted(rows[rows >= 0]) == list(range(7)) and len({len(s) for s in shards}) == 1


# --- recipes ---------------------------------------------------------------------------------------------

def test_finetune_recipes_validate_as_shipped():
    assert [p.name for p in FINETUNE_RECIPES] == ["finetune_mrpc.yaml", "finetune_sst2.yaml"]
    for recipe in FINETUNE_RECIPES:
        cfg = load_finetune_config(str(recipe), [])
        assert cfg.data.path == "nyu-mll/glue" and cfg.data.test_split == "validation"
        assert cfg.training.batch_size == 32 and cfg.training.epochs == 3 and cfg.data.max_length == 128
    assert load_finetune_config(str(ROOT / "recipes/finetune_mrpc.yaml"), []).task.text_pair_column == "sentence2"


# --- refusals --------------------------------------------------------------------------------------------

def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(n: int, label=lambda i: i % 2, **extra):
    return [{"text": f"example {i}", "text_pair": f"pair {i}", "label": label(i), **extra} for i in range(n)]


@pytest.fixture
def labelled(tmp_path):
    """A dataset directory of three good splits, and an empty directory for --model: a refusal that came after
    the model load would fail differently."""
    for split in ("train", "validation", "test"):
        _write(tmp_path / "data" / f"{split}.jsonl", _rows(6))
    (tmp_path / "model").mkdir()
    return tmp_path


def _refusal(capsys, argv):
    capsys.readouterr()
    code = main(["finetune", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def _argv(root: Path, *extra: str) -> list[str]:
    return ["--model", str(root / "model"), "--data", str(root / "data"), "--out", str(root / "out"), *extra]


@pytest.mark.parametrize("test_rows, extra, message", [
    (None, ["task.label_column=stars"], "task.label_column 'stars' is not a column of the train split"),
    (None, ["task.text_pair_column=second"], "task.text_pair_column 'second' is not a column of the train split"),
    (_rows(4, label=lambda i: 7), [], "has label 7, which the training split never has"),
    (_rows(4, label=lambda i: 0.5 * i), [], "regression labels in a classification task"),  # in train
    (_rows(4, label=lambda i: -1), [], "label -1 (a hidden label"),
    (_rows(4, label=lambda i: None), [], "row 0 of the test split 'test' has no label"),
    ([], [], "the test split 'test' of dataset"),
    (None, ["training.epochs=0"], "training.epochs must be >= 1"),
    (None, ["training.epochs=two"], "config key 'training.epochs' must be int"),
    (None, ["task.metric=pearson"], "task.metric 'pearson' does not score a classification task"),
    (None, ["data.validation_fraction=0.2"], "set one of data.validation_split and data.validation_fraction"),
    (None, ["data.max_train_samples=0"], "data.max_train_samples must be >= 1 or null"),
    (None, ["task.kind=regression", "task.label_column=text"], "has a non-numeric score"),
])
def test_refusals_are_one_line_before_the_model_loads(labelled, capsys, test_rows, extra, message):
    if test_rows is not None:
        # a dataset directory's splits share one schema: float labels go in every split
        for split in ("train", "validation", "test") if message.startswith("regression") else ("test",):
            _write(labelled / "data" / f"{split}.jsonl", test_rows)
    assert message in _refusal(capsys, _argv(labelled, *extra))


def test_max_train_samples_draws_the_same_random_rows_for_every_seed(labelled):
    """A label-sorted file must not give a one-class subset: the rows are drawn at random, by the base seed."""
    from distill.finetune.data import load_splits

    _write(labelled / "data" / "train.jsonl", _rows(40, label=lambda i: int(i >= 20)))
    args = [f"data.path={labelled / 'data'}", "model=m", f"output_dir={labelled / 'out'}"]
    subset = load_splits(load_finetune_config(None, [*args, "data.max_train_samples=10"])).train
    again = load_splits(load_finetune_config(None, [*args, "data.max_train_samples=10"])).train
    assert len(subset.labels) == 10 and subset.texts == again.texts
    assert 0 < sum(subset.labels) < 10
    assert len(load_splits(load_finetune_config(None, [*args, "data.max_train_samples=99"])).train.labels) == 40


def test_a_length_past_the_position_table_is_refused(demo_assets, labelled, capsys):
    from distill.models.from_scratch import init_model

    init_model(labelled / "roberta", demo_assets["tokenizer"], "roberta", layers=1, d_model=32, ffn=32, heads=2,
               max_positions=64)  # a table of 64 + pad_token_id + 1 rows
    argv = ["--model", str(labelled / "roberta"), "--data", str(labelled / "data"), "--out", str(labelled / "out")]
    assert "data.max_length 65 is more than" in _refusal(capsys, [*argv, "data.max_length=65"])


def test_missing_paths_are_refused(labelled, capsys):
    out = ["--out", str(labelled / "out")]
    assert "data.path not found" in _refusal(capsys, ["--model", str(labelled / "model"), *out,
                                                      "data.path=./nowhere.jsonl"])
    assert "model directory not found" in _refusal(capsys, ["--data", str(labelled / "data"), *out,
                                                            "model=./no-model"])
    assert "training.ds_config not found" in _refusal(capsys, _argv(labelled, "--ds-config", "no.json"))


# --- runs on tiny models ---------------------------------------------------------------------------------

WORDS = {0: ["dull", "bad", "weak"], 1: ["great", "fine", "warm"]}


def _task_data(root: Path, n_train: int = 24, n_eval: int = 9) -> Path:
    """A sentiment-like task a tiny model can learn: the label is which word list the sentence draws from;
    the pair repeats the word (or the other class's); the score is a noisy label."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        rows = []
        for i in range(n):
            y = int(rng.integers(2))
            word = WORDS[y][i % 3]
            rows.append({"text": f"the story was {word} today", "text_pair": f"it felt {WORDS[i % 2][i % 3]}",
                         "label": y, "score": y + float(rng.random())})
        _write(root / f"{split}.jsonl", rows)
    return root


@pytest.fixture(scope="module")
def tiny_bert(demo_assets, tmp_path_factory):
    from distill.models.from_scratch import init_model

    out = init_model(tmp_path_factory.mktemp("finetune") / "bert", demo_assets["tokenizer"], "bert", layers=1,
                     d_model=32, ffn=64, heads=2, max_positions=128)
    # no dropout: a run is then the same function of its global batches on any number of ranks
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return out


def _recomputed(out: Path, seed: int, regression: bool) -> dict:
    rows = [json.loads(line) for line in (out / "predictions" / f"seed-{seed}.jsonl").read_text().splitlines()]
    gold, pred = [r["label"] for r in rows], [r["prediction"] for r in rows]
    if regression:
        return {"pearson": metrics.pearson(gold, pred), "spearman": metrics.spearman(gold, pred)}
    return {"accuracy": sum(g == p for g, p in zip(gold, pred)) / len(gold),
            "macro_f1": metrics.macro_f1(gold, pred), "matthews": metrics.matthews(gold, pred)}


def _check_results(out: Path, seeds: list[int], regression: bool, n_test: int) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert [s["seed"] for s in results["seeds"]] == seeds
    for s in results["seeds"]:
        assert len((out / "predictions" / f"seed-{s['seed']}.jsonl").read_text().splitlines()) == n_test
        assert s["test"] == pytest.approx(_recomputed(out, s["seed"], regression), abs=1e-12)
    for name, ci in results["test"].items():
        assert ci == pytest.approx(metrics.t_interval([s["test"][name] for s in results["seeds"]]))
    assert "| mean [95% CI] |" in (out / "results.md").read_text()
    return results


def _single_process(argv: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "distill.cli", "finetune", *argv], cwd=ROOT, capture_output=True,
                          text=True, env={**env, "DS_ACCELERATOR": "cpu"}, timeout=600)


def test_single_process_sentence_pair_and_regression(tiny_bert, tmp_path):
    data = _task_data(tmp_path / "data")
    common = ["--model", str(tiny_bert), "--data", str(data)]
    settings = ["training.batch_size=8", "training.epochs=2", "training.learning_rate=1e-3",
                "task.text_pair_column=text_pair"]
    pair = _single_process([*common, "--out", str(tmp_path / "pair"), *settings, "task.metric=matthews"])
    assert pair.returncode == 0, pair.stderr[-3000:]
    results = _check_results(tmp_path / "pair", [42], False, 9)
    assert results["main_metric"] == "matthews" and results["test"]["accuracy"]["low"] is None
    reg = _single_process([*common, "--out", str(tmp_path / "reg"), "--ds-config", "ds_configs/student_zero3.json",
                           *settings, "task.kind=regression", "task.label_column=score"])
    assert reg.returncode == 0, reg.stderr[-3000:]
    results = _check_results(tmp_path / "reg", [42], True, 9)
    assert results["main_metric"] == "pearson" and set(results["test"]) == {"pearson", "spearman"}


def test_decoder_only_model_pads_with_its_end_of_text_token(demo_assets, tmp_path):
    """A LLaMA whose tokenizer has no pad token: the head reads the last real token, EOS pads the batch."""
    from transformers import AutoTokenizer

    from distill.models.from_scratch import init_model

    model = init_model(tmp_path / "llama", demo_assets["tokenizer"], "llama", layers=1, d_model=32, ffn=64, heads=2,
                       max_positions=128)
    tok = AutoTokenizer.from_pretrained(model)
    tok.pad_token = None
    tok.save_pretrained(model)
    assert AutoTokenizer.from_pretrained(model).pad_token is None
    data = _task_data(tmp_path / "data")
    run = _single_process(["--model", str(model), "--data", str(data), "--out", str(tmp_path / "out"),
                           "training.batch_size=8", "training.epochs=1"])
    assert run.returncode == 0, run.stderr[-3000:]
    _check_results(tmp_path / "out", [42], False, 9)


@pytest.mark.integration
def test_two_ranks_two_seeds_metrics_match_the_predictions(tiny_bert, tmp_path):
    import ranks

    data = _task_data(tmp_path / "data", n_train=30, n_eval=11)  # odd sizes: short last batch, padded shards
    out = tmp_path / "out"
    settings = ["training.batch_size=8", "training.epochs=2", "training.learning_rate=1e-3"]
    proc = ranks.launch(ROOT / "launchers/distill_cli.py",
                        ["finetune", "--model", tiny_bert, "--data", data, "--out", out, "--seeds", "2",
                         "--ds-config", ROOT / "ds_configs/student_zero3.json", *settings])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = _check_results(out, [42, 43], False, 11)
    assert results["ranks"] == 2 and all(1 <= s["best_epoch"] <= 2 for s in results["seeds"])
    assert results["test"]["accuracy"]["low"] is not None
    # one process under ZeRO-2 takes the same steps: the same global batches, the same head per seed
    alone = _single_process(["--model", str(tiny_bert), "--data", str(data), "--out", str(tmp_path / "alone"),
                             "--seeds", "2", *settings])
    assert alone.returncode == 0, alone.stderr[-3000:]
    single = _check_results(tmp_path / "alone", [42, 43], False, 11)
    for two, one in zip(results["seeds"], single["seeds"]):
        assert (two["best_epoch"], two["validation"], two["test"]) == (one["best_epoch"], one["validation"],
                                                                      pytest.approx(one["test"]))
    for seed in (42, 43):
        two, one = ([json.loads(line) for line in (root / f"predictions/seed-{seed}.jsonl").read_text().splitlines()]
                    for root in (out, tmp_path / "alone"))
        assert [(r["index"], r["label"], r["prediction"]) for r in two] == \
            [(r["index"], r["label"], r["prediction"]) for r in one]
        # to well below how much they differ between examples (a few 1e-6 for this barely trained model)
        np.testing.assert_allclose([r["probabilities"] for r in two], [r["probabilities"] for r in one], rtol=0,
                                   atol=1e-7)
        assert len({tuple(r["probabilities"]) for r in one}) > 1
