"""Faults of generate / evaluate / pseudo-label: stale output reused by a rerun with another model, data
or settings; models named alike in evaluate; a missing model directory sent to the hub; sources
longer than the model's position table."""

import json
import os
from pathlib import Path

import pytest

import ranks

from distill.cli import main

ROOT = Path(__file__).parents[1]
GEN = ["--max-new-tokens", "4", "--num-beams", "1", "--batch-size", "4"]


@pytest.fixture(scope="module")
def models(demo_assets, tmp_path_factory):
    """Two different models in directories with the same last name: runs/A/final and runs/B/final."""
    from distill.models.make_student import make_student

    root = tmp_path_factory.mktemp("runs")
    make_student(str(demo_assets["teacher"]), str(root / "A" / "final"), decoder_layers=1)
    make_student(str(demo_assets["teacher"]), str(root / "B" / "final"), encoder_layers=1, decoder_layers=1)
    return root / "A" / "final", root / "B" / "final"


@pytest.fixture(scope="module")
def data(demo_assets):
    return ["--data", str(demo_assets["data"]), "--split", "test"]


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distill: error: "), err
    return err[0]


def test_generate_rerun_with_another_model_is_refused_and_fresh_starts_over(models, data, tmp_path, capsys):
    a, b = models
    out, alone = tmp_path / "preds.jsonl", tmp_path / "b.jsonl"
    assert main(["generate", "--model", str(a), *data, "--out", str(out), *GEN]) == 0
    written = out.read_text()
    assert (tmp_path / "preds.jsonl.fingerprint.json").is_file()
    capsys.readouterr()
    assert main(["generate", "--model", str(b), *data, "--out", str(out), *GEN]) == 2
    error = one_error(capsys)
    assert f"{out} was written by another model (model.path: '{a}' there, '{b}' now)" in error
    assert error.endswith("pass --fresh to start over, or another --out")
    assert out.read_text() == written
    assert main(["generate", "--model", str(b), *data, "--out", str(out), *GEN, "--fresh"]) == 0
    assert main(["generate", "--model", str(b), *data, "--out", str(alone), *GEN]) == 0
    assert [(r["id"], r["prediction"]) for r in read(out)] == [(r["id"], r["prediction"]) for r in read(alone)]


@pytest.mark.parametrize("change, item", [
    (["--max-new-tokens", "3"], "with other settings (settings.generation.max_new_tokens: 4 there, 3 now)"),
    (["--source-prefix", "summarize: "], "with other settings (settings.source_prefix: '' there, 'summarize: ' now)"),
    (["--max-source-length", "64"], "with other settings (settings.max_source_length: 512 there, 64 now)"),
    (["--max-samples", "5"], "for other data (data.examples:"),
    (["--split", "validation"], "for other data (data.split: 'test' there, 'validation' now)"),
])
def test_generate_rerun_with_other_data_or_settings_is_refused(models, data, tmp_path, capsys, change, item):
    out = tmp_path / "preds.jsonl"
    assert main(["generate", "--model", str(models[0]), *data, "--out", str(out), *GEN]) == 0
    written = out.read_text()
    capsys.readouterr()
    assert main(["generate", "--model", str(models[0]), *data, "--out", str(out), *GEN, *change]) == 2
    assert item in one_error(capsys)
    assert out.read_text() == written


def test_changed_weights_in_the_same_directory_are_another_model(models, data, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(models[0], model)
    out = tmp_path / "preds.jsonl"
    assert main(["generate", "--model", str(model), *data, "--out", str(out), *GEN]) == 0
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten in place
    capsys.readouterr()
    assert main(["generate", "--model", str(model), *data, "--out", str(out), *GEN]) == 2
    assert "was written by another model (model.files:" in one_error(capsys)


def test_output_without_fingerprint_is_refused(models, data, tmp_path, capsys):
    """A finished file of an older distill, which recorded nothing of what wrote it."""
    out = tmp_path / "preds.jsonl"
    out.write_text("".join(json.dumps({"id": i, "prediction": "old", "new_tokens": 1, "ms": 1.0}) + "\n"
                           for i in range(8)))
    assert main(["generate", "--model", str(models[0]), *data, "--out", str(out), *GEN]) == 2
    assert f"{out} was written by an older distill" in one_error(capsys)
    assert main(["generate", "--model", str(models[0]), *data, "--out", str(out), *GEN, "--fresh"]) == 0
    assert "old" not in {r["prediction"] for r in read(out)}


def test_evaluate_names_models_apart_and_refuses_stale_predictions(models, data, tmp_path, capsys):
    a, b = models
    out = tmp_path / "eval"
    common = [*data, "--out", str(out), *GEN, "--bootstrap-samples", "20"]
    assert main(["evaluate", "--model", str(a), "--model", str(b), *common]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["A_final", "B_final"]
    assert results["A_final"]["params_m"] > results["B_final"]["params_m"]
    # each alone into the same directory: both named "final", but B does not get A's predictions
    assert main(["evaluate", "--model", str(a), *common]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(b), *common]) == 2
    assert "final.jsonl was written by another model" in one_error(capsys)
    assert main(["evaluate", "--model", str(b), *common, "--fresh"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert list(again) == ["final"] and again["final"]["params_m"] == results["B_final"]["params_m"]


@pytest.mark.parametrize("names, message", [
    (["x"], "got 1 --model-name for 2 --model"),
    (["x", "x"], "two models would both be named 'x'"),
    (["x", "a/b"], "--model-name 'a/b' must be letters, digits"),
])
def test_evaluate_model_names_are_checked_first(models, tmp_path, capsys, names, message):
    flags = [arg for name in names for arg in ("--model-name", name)]
    code = main(["evaluate", "--model", str(models[0]), "--model", str(models[1]), *flags, "--data",
                 str(tmp_path / "no-such-data"), "--out", str(tmp_path / "eval")])
    assert code == 2 and message in one_error(capsys)


def test_model_names_default_to_the_shortest_distinguishing_tail(tmp_path):
    from distill.infer.evaluate import model_names

    assert model_names([str(tmp_path / "runs/A/final"), str(tmp_path / "runs/B/final")]) == ["A_final", "B_final"]
    assert model_names([str(tmp_path / "teacher"), str(tmp_path / "s/final")]) == ["teacher", "final"]
    assert model_names(["facebook/bart-large-xsum", "sshleifer/distilbart-xsum-12-6"]) == [
        "bart-large-xsum", "distilbart-xsum-12-6"]
    assert model_names([str(tmp_path / "x"), str(tmp_path / "x")], ["one", "two"]) == ["one", "two"]


@pytest.mark.parametrize("command", ["generate", "evaluate", "pseudo-label"])
@pytest.mark.parametrize("model", ["runs/nope/final", "./nope", "~/no-such-model-dir"])
def test_missing_model_directory_is_one_line_before_any_data(tmp_path, capsys, command, model):
    code = main([command, "--model", model, "--data", str(tmp_path / "no-such-data"), "--out", str(tmp_path / "o")])
    assert code == 2 and one_error(capsys) == f"distill: error: model directory not found: {model}"


def test_is_local_path(tmp_path, monkeypatch):
    from distill.paths import is_local_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    for local in ("./x", "/x", "~/x", "~x", "runs/a/final", "here"):
        assert is_local_path(local), local
    for hub in ("gpt2", "facebook/bart-large", "t5-small"):
        assert not is_local_path(hub), hub


def test_max_source_length_defaults_to_the_model_limit(demo_assets, tmp_path, capsys):
    """The demo teacher has 512 positions: a longer source is cut to 512 tokens, not to the old 1024
    (which ran past the position table); a larger explicit length is refused before any data loads."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    teacher = str(demo_assets["teacher"])
    tok = AutoTokenizer.from_pretrained(teacher)
    source = " ".join(["The minister said the plan would cost 40 million pounds."] * 100)
    assert len(tok(source)["input_ids"]) > 600
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"document": source, "summary": "a plan"}) + "\n")
    out = tmp_path / "preds.jsonl"
    assert main(["generate", "--model", teacher, "--data", str(data), "--split", "train", "--out", str(out), *GEN]) == 0
    model = AutoModelForSeq2SeqLM.from_pretrained(teacher).eval()
    with torch.no_grad():
        ids = model.generate(**tok(source, return_tensors="pt", truncation=True, max_length=512), max_new_tokens=4,
                             num_beams=1, do_sample=False)
    assert read(out)[0]["prediction"] == tok.decode(ids[0], skip_special_tokens=True)
    fingerprint = json.loads((tmp_path / "preds.jsonl.fingerprint.json").read_text())
    assert fingerprint["settings"]["max_source_length"] == 512
    capsys.readouterr()
    code = main(["generate", "--model", teacher, "--data", str(tmp_path / "no-such-data"), "--out", str(out),
                 "--max-source-length", "600"])
    assert code == 2
    assert one_error(capsys).endswith("--max-source-length 600 is more than the model takes (512 positions)")


def test_source_length_without_a_position_table():
    from types import SimpleNamespace

    from distill.infer.generate import source_length

    t5_like = SimpleNamespace()  # relative positions: the tokenizer's limit, else the old default
    assert source_length(t5_like, SimpleNamespace(model_max_length=512)) == 512
    assert source_length(t5_like, SimpleNamespace(model_max_length=int(1e30))) == 1024
    assert source_length(t5_like, SimpleNamespace(model_max_length=512), 4096) == 4096  # advice, not a limit
    assert source_length(SimpleNamespace(n_positions=256), SimpleNamespace(model_max_length=1024)) == 256


def test_pseudo_label_rerun_with_another_teacher_is_refused(models, demo_assets, tmp_path, capsys):
    out = tmp_path / "pl"
    common = ["--data", str(demo_assets["data"]), "--out", str(out), *GEN, "--max-samples", "6"]
    assert main(["pseudo-label", "--model", str(models[0]), *common]) == 0
    capsys.readouterr()
    assert main(["pseudo-label", "--model", str(models[1]), *common]) == 2
    assert "train.jsonl was written by another model" in one_error(capsys)
    assert main(["pseudo-label", "--model", str(models[1]), *common, "--fresh"]) == 0
    labels = {r["id"]: r["prediction"] for r in read(out / ".pseudo_label" / "train.jsonl")}
    assert [r["summary"] for r in read(out / "train.jsonl")] == [labels[i] for i in range(6)]


@pytest.mark.integration
def test_two_ranks_agree_to_refuse_a_stale_output(models, data, tmp_path):
    """Rank 0 checks the fingerprint; the other rank must stop with it, not wait in a collective."""
    out = tmp_path / "preds.jsonl"
    assert main(["generate", "--model", str(models[0]), *data, "--out", str(out), *GEN]) == 0
    written = out.read_text()
    proc = ranks.launch(ROOT / "launchers/distill_cli.py", ["generate", "--model", str(models[1]), *data,
                                                             "--out", str(out), *GEN], timeout=300)
    text = proc.stdout + proc.stderr
    errors = [line for line in text.splitlines() if "distill: error:" in line]
    assert proc.returncode != 0 and len(errors) == 1 and "was written by another model" in errors[0], text[-3000:]
    assert "Traceback" not in text and out.read_text() == written


def test_disk_full_in_generate_is_one_line_on_its_own_and_leaves_no_temp_file(models, data, tmp_path, capsys,
                                                                              monkeypatch):
    """ENOSPC while the merged output is written (the progress bar still open): one line, below the bar,
    and no half-written temp file."""
    import errno

    from distill import files

    real = os.fsync

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".preds.jsonl.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(files.os, "fsync", full)
    out = tmp_path / "preds.jsonl"
    assert main(["generate", "--model", str(models[0]), *data, "--out", str(out), *GEN]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "distill: error:" in line]
    assert errors == [f"distill: error: no space left on device ({out})"], err[-2000:]
    assert not (tmp_path / ".preds.jsonl.tmp").exists() and not out.exists()


def test_disk_full_in_export_is_one_line_and_leaves_nothing(demo_assets, tmp_path, monkeypatch):
    """safetensors reports ENOSPC as its own SafetensorError: still one line, and no .NAME.tmp folder."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, modeling_utils

    from distill.errors import DistillError
    from distill.infer.export import write_model_dir

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    state = AutoModelForSeq2SeqLM.from_pretrained(demo_assets["teacher"]).state_dict()
    out = tmp_path / "exp"
    with pytest.raises(DistillError, match=r"writing .*exp failed: no space left on device \("):
        write_model_dir(AutoConfig.from_pretrained(demo_assets["teacher"]), state, None, out)
    assert sorted(tmp_path.iterdir()) == []


def test_an_error_while_a_progress_bar_runs_is_on_a_line_of_its_own(models, data, tmp_path, capsys, monkeypatch):
    from distill.errors import DistillError
    from distill.infer import generate

    real, calls = generate.generate_batch, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise DistillError("the second batch failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "generate_batch", second_fails)
    assert main(["generate", "--model", str(models[0]), *data, "--out", str(tmp_path / "p.jsonl"), *GEN]) == 2
    err = capsys.readouterr().err
    assert "\ndistill: error: the second batch failed\n" in err, err[-1000:]


@pytest.mark.parametrize("name", ["no-such-model", "runs/final"])
def test_a_missing_local_name_is_one_line_at_once_when_the_hub_is_unreachable(name, monkeypatch):
    """A name with no folder here goes to the hub; when the hub cannot be reached, one line says so at once
    (the hub client used to retry five times over 25 s before failing)."""
    import time

    from huggingface_hub import constants

    from distill import paths
    from distill.config.settings import ModelConfig
    from distill.errors import DistillError
    from distill.models.loading import load_model_config

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    paths.hub_reachable.cache_clear()
    start = time.monotonic()
    with pytest.raises(DistillError, match=f"student.path {name} is not a directory here, and the hub cannot be "
                                           "reached"):
        load_model_config(ModelConfig(path=name), "student")
    assert time.monotonic() - start < 5
    paths.hub_reachable.cache_clear()
