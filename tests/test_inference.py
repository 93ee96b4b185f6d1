"""Generation, evaluation, pseudo-labelling and export outside training: the ``distill`` commands on
tiny local models, one process and 2 ranks."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ranks

from distill.cli import main

ROOT = Path(__file__).parents[1]
DISTILL = str(Path(sys.executable).with_name("distill"))
GEN = ["--max-new-tokens", "6", "--num-beams", "1", "--batch-size", "3"]


@pytest.fixture(scope="module")
def data(demo_assets):
    return ["--data", str(demo_assets["data"]), "--split", "test"]


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_write_model_dir_reties_and_shards(tmp_path):
    """T5 ties embeddings and LM head (DeepSpeed's own safetensors writer fails on that)."""
    from transformers import T5Config, T5ForConditionalGeneration

    from distill.infer.export import write_model_dir

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                num_heads=4, decoder_start_token_id=0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    write_model_dir(model.config, state, None, tmp_path / "out", max_shard_size="40KB", card="# card\n")
    assert (tmp_path / "out" / "model.safetensors.index.json").exists() and (tmp_path / "out" / "README.md").exists()
    back = T5ForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert back.lm_head.weight.data_ptr() == back.shared.weight.data_ptr()
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    write_model_dir(model.config, state, None, tmp_path / "bf16", dtype=torch.bfloat16)
    assert T5ForConditionalGeneration.from_pretrained(tmp_path / "bf16").shared.weight.dtype == torch.bfloat16


def test_greedy_generate_equals_plain_model_generate(trained_teacher, demo_assets, data, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(trained_teacher), *data, "--out", str(out), *GEN]) == 0
    records = read(out)
    model = AutoModelForSeq2SeqLM.from_pretrained(trained_teacher).eval()
    tok = AutoTokenizer.from_pretrained(trained_teacher)
    import datasets

    sources = datasets.load_dataset(str(demo_assets["data"]), split="test")["document"]
    assert [r["id"] for r in records] == list(range(len(sources)))
    assert len({r["prediction"] for r in records}) > 1  # the output depends on the input
    for record, source in zip(records, sources):  # one at a time: no padding at all
        enc = tok(source, return_tensors="pt", truncation=True, max_length=1024)
        ids = model.generate(**enc, max_new_tokens=6, num_beams=1, do_sample=False)
        assert record["prediction"] == tok.decode(ids[0], skip_special_tokens=True)
        special = set(tok.all_special_ids)
        assert record["new_tokens"] == sum(t not in special for t in ids[0].tolist()) and record["ms"] > 0


def test_generate_resumes_without_redoing_work(trained_teacher, data, tmp_path):
    out = tmp_path / "gen.jsonl"
    parts = tmp_path / "gen.jsonl.parts"
    args = ["generate", "--model", str(trained_teacher), *data, "--out", str(out), *GEN]
    assert main(args) == 0  # leaves the fingerprint of model, data and settings beside the output
    out.unlink()
    parts.mkdir()
    # what an interrupted run left: three finished records and a line cut mid-write
    (parts / "rank0-of2-1.jsonl").write_text("".join(
        json.dumps({"id": i, "prediction": f"kept {i}", "new_tokens": 1, "ms": 1.0}) + "\n" for i in (0, 3, 5))
        + '{"id": 6, "predic')
    assert main(args) == 0
    records = read(out)
    assert [r["id"] for r in records] == list(range(8))
    assert [r["prediction"] for r in records if r["prediction"].startswith("kept")] == ["kept 0", "kept 3", "kept 5"]
    assert not parts.exists()


def test_evaluate_side_by_side(trained_teacher, data, tmp_path):
    from distill.models.make_student import make_student

    student = tmp_path / "student"
    make_student(str(trained_teacher), str(student), decoder_layers=1)
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(trained_teacher), "--model", str(student), *data, "--out", str(out),
                 *GEN, "--bootstrap-samples", "50"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["trained-teacher", "student"]
    for row in results.values():
        assert row["n"] == 8 and 0 <= row["rouge2_low"] <= row["rouge2"] <= row["rouge2_high"] <= 100
        assert row["ms_per_example"] > 0 and row["tokens_per_sec"] > 0
    teacher, student = results["trained-teacher"], results["student"]
    assert teacher["speedup"] == 1.0 and student["params_m"] < teacher["params_m"] and teacher["rouge1"] > 0
    table = (out / "results.md").read_text()
    assert table.startswith("| model | rouge1 |") and "| student |" in table


@pytest.mark.parametrize("args, message", [
    (["--source-column", "article"], "data.source_column 'article' is not a column"),
    (["--split", "nonexistent"], "cannot load input split 'nonexistent'"),
    (["--num-beams", "0"], "--num-beams must be >= 1, got 0"),
])
def test_generate_bad_input(trained_teacher, data, tmp_path, capsys, args, message):
    code = main(["generate", "--model", str(trained_teacher), *data, "--out", str(tmp_path / "g.jsonl"),
                 "--max-new-tokens", "2", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "g.jsonl").exists()


def _launch(args):
    return ranks.launch(ROOT / "launchers/distill_cli.py", args)


@pytest.mark.integration
def test_two_ranks_return_every_input_once_in_order(trained_teacher, demo_assets, tmp_path):
    args = ["--model", str(trained_teacher), "--data", str(demo_assets["data"]), "--split", "validation",
            *GEN, "--batch-size", "2"]
    one = tmp_path / "one.jsonl"
    assert main(["generate", *args, "--out", str(one)]) == 0
    two = tmp_path / "two.jsonl"
    proc = _launch(["generate", *args, "--out", str(two)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    a, b = read(one), read(two)
    assert [r["id"] for r in b] == list(range(24))  # 24 inputs, 12 batches over 2 ranks
    assert [r["prediction"] for r in b] == [r["prediction"] for r in a]
    # partitioned over the ranks (ZeRO-3), generation synchronized: the same text
    zero3 = tmp_path / "zero3.jsonl"
    proc = _launch(["generate", *args, "--out", str(zero3), "--ds-config", str(ROOT / "ds_configs/teacher_zero3.json")])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert [r["prediction"] for r in read(zero3)] == [r["prediction"] for r in a]


@pytest.mark.integration
def test_pseudo_labels_interrupted_resumed_and_trained_on(trained_teacher, demo_assets, tmp_path):
    out = tmp_path / "pl"
    args = [DISTILL, "pseudo-label", "--model", str(trained_teacher), "--data", str(demo_assets["data"]),
            "--out", str(out), "--max-new-tokens", "8", "--batch-size", "1", "--max-samples", "60",
            "--min-rouge2", "1.0", "--below", "gold"]
    work = out / ".pseudo_label" / "train.jsonl.parts"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it once a few labels are on disk
        done = sum(len(p.read_text().splitlines()) for p in work.glob("*.jsonl")) if work.exists() else 0
        if done >= 5:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from distill.infer.outputs import done_records

    before = done_records(out / ".pseudo_label" / "train.jsonl")  # a line the kill cut short is skipped
    assert 5 <= len(before) < 60 and not (out / "train.jsonl").exists()

    assert subprocess.run(args, capture_output=True, text=True).returncode == 0
    merged = {r["id"]: r for r in read(out / ".pseudo_label" / "train.jsonl")}
    assert sorted(merged) == list(range(60))
    assert all(merged[i] == r for i, r in before.items())  # finished work kept, not redone
    rows = read(out / "train.jsonl")
    summary = json.loads((out / "pseudo_label.json").read_text())
    assert len(rows) == 60 and summary["pseudo_labels"] + summary["gold_fallback"] == 60
    for row in rows:  # a label under the ROUGE-2 bar falls back to the gold summary
        assert row["summary"] == (row["gold_summary"] if row["pseudo_rouge2"] < 1.0 else merged[rows.index(row)]["prediction"])
    assert len(read(out / "validation.jsonl")) == 24

    from distill.models.make_student import make_student

    student = tmp_path / "student"
    make_student(str(trained_teacher), str(student), decoder_layers=1)
    run = tmp_path / "run"
    proc = ranks.launch(ROOT / "launchers/run.py", [
        "--config", ROOT / "recipes/distilbart_xsum_pl.yaml", f"student.path={student}", f"data.path={out}",
        "training.precision=fp32", "training.micro_batch_size=4", "training.gradient_accumulation_steps=1",
        "training.max_steps=3", "training.warmup_steps=0", "training.save_every=3", "training.log_every=1",
        "training.eval_every=0", f"training.output_dir={run}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (run / "final" / "model.safetensors").exists()


def test_decoder_only_generation_pads_prompts_on_the_left(demo_assets, tmp_path):
    """A batch of prompts of different lengths gives what each prompt gives alone."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(demo_assets["tokenizer"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(tmp_path / "llama"), "--data", str(demo_assets["data"]), "--split", "test",
                 "--out", str(out), "--max-new-tokens", "5", "--min-new-tokens", "5", "--batch-size", "4"]) == 0
    model = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    import datasets

    sources = datasets.load_dataset(str(demo_assets["data"]), split="test")["document"]
    records = read(out)
    for record, source in zip(records, sources):
        enc = tok(source, return_tensors="pt")
        ids = model.generate(**enc, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert record["prediction"] == tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len({r["prediction"] for r in records}) > 1
