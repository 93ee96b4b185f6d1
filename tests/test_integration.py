"""Real runs: 2 CPU ranks under the deepspeed launcher, teacher and student both ZeRO-3 partitioned."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import ranks
from distill.train import checkpoint
from ranks import launch_run as launch, metrics

ROOT = Path(__file__).parents[1]
KD = ROOT / "recipes/demo/kd.yaml"
pytestmark = pytest.mark.integration


TRAIN = ["training.micro_batch_size=4", "training.max_steps=8", "training.save_every=4", "training.log_every=1",
         "training.learning_rate=3e-3", "training.warmup_steps=0", "data.max_train_samples=null",
         "data.max_eval_samples=16", "training.eval_every=4", "eval.generate=true", "eval.max_samples=6",
         "eval.max_new_tokens=8", "eval.best_metric=eval/rougeL"]


@pytest.fixture(scope="module")
def runs(pair, tiny_family, demo_assets, tmp_path_factory):
    """The module's runs that succeed, in one launch: KD of the BART pair (``kd``, 8 steps, evaluated with
    generation) and 3 steps of a T5 pair (``t5``)."""
    from distill.models.make_student import make_student

    root = tmp_path_factory.mktemp("runs")
    make_student(str(tiny_family["t5"]), str(root / "t5-student"), decoder_layers=1)
    t5 = [f"teacher.path={tiny_family['t5']}", f"student.path={root / 't5-student'}", f"data.path={demo_assets['data']}",
          "data.source_prefix=summarize: ", "training.micro_batch_size=4", "training.max_steps=3",
          "training.save_every=3", "training.log_every=1", "data.max_eval_samples=8", "training.warmup_steps=0"]
    proc = ranks.launch_jobs([(KD, [*pair, *TRAIN, f"training.output_dir={root / 'kd'}"]),
                              (KD, [*t5, f"training.output_dir={root / 't5'}"])], root / "jobs.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def kd_run(runs):
    return runs / "kd"


def test_each_rank_holds_half_of_each_model(kd_run):
    info = json.loads((kd_run / "run_info.json").read_text())
    assert info["world_size"] == 2
    for name in ("teacher", "student"):
        total, per_rank = info[name]["params"], info[name]["params_per_rank"]
        assert len(per_rank) == 2
        for share in per_rank:
            assert 0.45 < share / total < 0.6, (name, share, total)


def test_loss_falls(kd_run):
    m = metrics(kd_run)
    assert sorted(m) == list(range(1, 9))
    first = sum(m[s]["loss/total"] for s in (1, 2)) / 2
    last = sum(m[s]["loss/total"] for s in (7, 8)) / 2
    assert last < 0.9 * first, (first, last)


def test_tensorboard_holds_every_family(kd_run):
    """Read with tensorboard's own reader: every family present, every value finite, one directory."""
    import math

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert [p.name for p in (kd_run / "tensorboard").iterdir() if p.is_dir()] == []  # rank 0 only, one run
    acc = EventAccumulator(str(kd_run / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    families = {
        "loss": ["loss/total", "loss/ce", "loss/kd"], "weight": ["weight/ce", "weight/kd"],
        "optimizer": ["train/lr", "train/grad_norm", "train/epoch"],
        "speed": ["perf/tokens_per_sec", "perf/teacher_sec_per_step", "perf/student_sec_per_step",
                  "perf/loss_sec_per_step"],
        "memory": ["perf/peak_memory_gb"],
        "agreement": ["agreement/top1", "agreement/teacher_entropy", "agreement/student_entropy"],
        "evaluation": ["eval/ce", "eval/token_accuracy", "eval/rouge1", "eval/rouge2", "eval/rougeL", "eval/rougeLsum"],
    }
    for family, names in families.items():
        for tag in names:
            assert tag in tags, (family, tag)
            values = [e.value for e in acc.Scalars(tag)]
            assert values and all(math.isfinite(v) for v in values), (tag, values)
    assert [e.step for e in acc.Scalars("loss/total")] == list(range(1, 9))
    assert all(e.value > 0 for e in acc.Scalars("perf/tokens_per_sec"))
    assert all(0 <= e.value <= 1 for e in acc.Scalars("agreement/top1"))
    assert all(e.value > 0 for e in acc.Scalars("agreement/teacher_entropy"))
    assert {"config/text_summary", "eval/samples/text_summary"} <= set(acc.Tags()["tensors"])
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(acc.PluginTagToContent("hparams"))


def test_checkpoints_and_export(kd_run):
    from transformers import AutoModelForSeq2SeqLM

    ckpt = kd_run / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-00000008"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step-00000004", "step-00000008"]
    model = AutoModelForSeq2SeqLM.from_pretrained(kd_run / "final")
    assert model.config.decoder_layers == 1
    assert model.get_input_embeddings().weight.abs().sum() > 0  # gathered, not empty ZeRO-3 placeholders


def test_corrupted_latest_falls_back_and_resumes_like_uninterrupted(kd_run, tmp_path):
    """Flip one byte of the last checkpoint's optimizer state: the run says so in one line, resumes from
    the step-4 checkpoint, and matches the run that never stopped, one metrics row per step (its batches
    made by two loader processes per rank, the uninterrupted run's by the training processes)."""
    full = kd_run
    cut = tmp_path / "run"
    shutil.copytree(full, cut)
    optim = sorted((cut / "checkpoints" / "step-00000008").glob("*optim_states.pt"))[0]
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0x40
    optim.write_bytes(bytes(data))
    shutil.rmtree(cut / "final")
    proc = launch([f"training.output_dir={cut}", "eval.text_samples=2", "data.num_workers=2"], recipe=cut / "config.yaml")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checkpoint step-00000008 is damaged" in proc.stdout and "resuming from step-00000004" in proc.stdout
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    assert "changed settings: eval.text_samples: 3 -> 2" in proc.stdout
    before, after = metrics(full), metrics(cut)
    rows = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()
            if "loss/total" in line]
    assert rows == list(range(1, 9))  # the replayed steps 5-8 replace the old rows, not duplicate them
    for step in (5, 6, 7, 8):
        for key in ("loss/total", "loss/ce", "loss/kd", "train/lr", "train/grad_norm"):
            assert after[step][key] == pytest.approx(before[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert sorted(p.name for p in (cut / "configs").iterdir())[-1].endswith("step-00000004.yaml")
    assert checkpoint.verify(cut / "checkpoints" / "step-00000008") is None  # rewritten whole


def _one_error(proc) -> str:
    text = proc.stdout + proc.stderr
    errors = [line for line in text.splitlines() if "distill: error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in text, text[-3000:]
    return errors[0]


def test_a_new_run_never_touches_an_earlier_one(kd_run, tmp_path):
    """resume=never on a directory holding a run, or a resumed run that cannot keep the global batch: one line
    each, before any model loads, and the earlier run's checkpoints are all still there."""
    run = tmp_path / "run"
    shutil.copytree(kd_run, run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "already holds a run and training.resume is never" in _one_error(
        launch([f"training.output_dir={run}", "training.resume=never"], recipe=run / "config.yaml"))
    assert "which 2 ranks of training.micro_batch_size 3 cannot split evenly" in _one_error(
        launch([f"training.output_dir={run}", "training.micro_batch_size=3"], recipe=run / "config.yaml"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_divergence_stops_the_run_and_keeps_finite_checkpoints(pair, tmp_path):
    out = tmp_path / "run"
    line = _one_error(launch([*pair, *TRAIN, f"training.output_dir={out}", "training.learning_rate=1e30",
                              "training.save_every=1", "training.max_nonfinite_steps=2", "eval.generate=false",
                              "eval.best_metric=null", "training.eval_every=0"]))
    assert "training diverged: the loss or gradient norm was not finite for 2 steps in a row" in line
    assert not (out / "final").exists()
    for tag in checkpoint.complete_tags(out / "checkpoints"):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=tag)
        assert all(torch.isfinite(v).all() for v in state.values()), tag


def test_divergence_is_counted_at_saves_and_keeps_the_checkpoint_before_it(pair, tmp_path):
    """log_every=10: the streak is still read at each save (no per-step host read), so the run stops at the
    limit, and the checkpoint saved inside the streak prunes nothing (keep_checkpoints=1)."""
    out = tmp_path / "run"
    line = _one_error(launch([*pair, *TRAIN, f"training.output_dir={out}", "training.learning_rate=1e30",
                              "training.save_every=1", "training.log_every=10", "training.keep_checkpoints=1",
                              "training.max_nonfinite_steps=2", "eval.generate=false", "eval.best_metric=null",
                              "training.eval_every=0"]))
    assert "not finite for 2 steps in a row, up to step 3" in line, line
    tags = sorted(checkpoint.complete_tags(out / "checkpoints"))
    assert tags == ["step-00000001", "step-00000002"], tags  # step 1, the last before the streak, is kept


def test_bad_input_is_one_line_through_the_launcher(pair, tmp_path):
    out = tmp_path / "run"
    proc = launch([*pair, *TRAIN, f"training.output_dir={out}", "data.target_column=highlights"])
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    errors = [line for line in text.splitlines() if "distill: error:" in line]
    assert errors == ["distill: error: data.target_column 'highlights' is not a column of the train split "
                      "'train' (columns: id, document, summary)"]
    assert "Traceback" not in text
    assert not (out / "checkpoints").exists()


def tiny(config_cls, out, **kw):
    model_cls = {"T5Config": "T5ForConditionalGeneration", "PegasusConfig": "PegasusForConditionalGeneration",
                 "MarianConfig": "MarianMTModel", "LlamaConfig": "LlamaForCausalLM", "BertConfig": "BertForMaskedLM",
                 "XLMRobertaConfig": "XLMRobertaForMaskedLM",
                 "ModernBertConfig": "ModernBertForMaskedLM"}[config_cls.__name__]
    import transformers

    torch_model = getattr(transformers, model_cls)(config_cls(**kw))
    torch_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_family(demo_assets, tmp_path_factory):
    """T5, Pegasus, Marian, LLaMA, BERT, XLM-R and ModernBERT models with the demo tokenizer, sized so ZeRO-3
    partitions them."""
    from transformers import (AutoTokenizer, BertConfig, LlamaConfig, MarianConfig, ModernBertConfig, PegasusConfig,
                              T5Config, XLMRobertaConfig)

    root = tmp_path_factory.mktemp("family")
    tok = AutoTokenizer.from_pretrained(demo_assets["tokenizer"])
    vocab = 1336
    common = dict(vocab_size=vocab, pad_token_id=1, eos_token_id=2)
    seq2seq = dict(d_model=128, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=256, decoder_ffn_dim=256,
                   encoder_attention_heads=4, decoder_attention_heads=4, decoder_start_token_id=2,
                   max_position_embeddings=256, **common)
    models = {
        "t5": tiny(T5Config, root / "t5", d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2,
                   decoder_start_token_id=1, **common),
        "pegasus": tiny(PegasusConfig, root / "pegasus", **seq2seq),
        "marian": tiny(MarianConfig, root / "marian", **seq2seq),
        "llama": tiny(LlamaConfig, root / "llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, **common),
        **{name: tiny(config_cls, root / name, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=258, **common, **extra)
           for name, config_cls, extra in [
               ("bert", BertConfig, {}), ("xlm-roberta", XLMRobertaConfig, {}),
               ("modernbert", ModernBertConfig, dict(bos_token_id=0, cls_token_id=0, sep_token_id=2,
                                                     global_attn_every_n_layers=2, local_attention=4))]},
    }
    for path in models.values():
        tok.save_pretrained(path)
    return models


def test_every_family_loads_partitioned(tiny_family):
    proc = ranks.launch(ROOT / "tests/scripts/load_zero3.py", list(tiny_family.values()))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["type"] for r in rows) == ["bert", "llama", "marian", "modernbert", "pegasus", "t5", "xlm-roberta"]
    for r in rows:
        assert r["max_diff"] < 1e-4 and r["fused_diff"] < 1e-4 and 0.45 < r["share"] < 0.6, r


def test_t5_distills(runs):
    m = metrics(runs / "t5")
    assert sorted(m) == [1, 2, 3] and all(r["loss/kd"] >= 0 for r in m.values())


def test_encoder_decoder_teacher_with_decoder_only_student_is_refused(tiny_family, demo_assets, tmp_path, capsys):
    from distill.train.launch import main

    code = main(["--config", str(KD), f"teacher.path={demo_assets['teacher']}",
                 f"student.path={tiny_family['llama']}", f"data.path={demo_assets['data']}",
                 f"training.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == "distill: error: teacher is encoder-decoder but student is decoder-only"
    assert not (tmp_path / "run").exists()


def test_generation_during_training_and_best_checkpoint(kd_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(kd_run / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    for tag in ("eval/rouge1", "eval/rouge2", "eval/rougeL", "eval/rougeLsum"):
        assert [e.step for e in acc.Scalars(tag)] == [4, 8], tag
    assert "eval/samples/text_summary" in acc.Tags()["tensors"]
    best = json.loads((kd_run / "best.json").read_text())
    assert best["metric"] == "eval/rougeL" and best["step"] in (4, 8)
    assert best["value"] == max(e.value for e in acc.Scalars("eval/rougeL"))
    assert (kd_run / "best" / "model.safetensors").exists() and (kd_run / "best" / "README.md").exists()


def test_offline_export_matches_deepspeed_consolidation(kd_run, tmp_path, capsys):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModelForSeq2SeqLM

    from distill.cli import main

    run = kd_run
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    ours = load_file(tmp_path / "out" / "model.safetensors")
    reference = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step-00000008")
    assert not any(k.startswith("projections") for k in ours)
    for key, value in ours.items():
        assert (value - reference["model." + key]).abs().max() <= 1e-6, key
    in_training = load_file(run / "final" / "model.safetensors")  # gathered from the live engine at step 8
    assert set(in_training) == set(ours)
    for key in ours:
        assert torch.allclose(ours[key], in_training[key], atol=1e-6), key
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.shared.weight.data_ptr()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Recipe" in card and "eval/ce" in card

    # an older checkpoint by its tag directory, and in bfloat16
    assert main(["export", str(run / "checkpoints" / "step-00000004"), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16


def test_export_refuses_incomplete_or_foreign_checkpoints(kd_run, tmp_path, capsys, demo_assets):
    from distill.cli import main
    from distill.models.make_student import make_student

    torn = tmp_path / "torn"
    shutil.copytree(kd_run / "checkpoints" / "step-00000008", torn / "step-00000008")
    (torn / "step-00000008" / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    capsys.readouterr()
    assert main(["export", str(torn / "step-00000008"), str(tmp_path / "x")]) == 2
    assert "is damaged or incomplete: zero_pp_rank_1_mp_rank_00_model_states.pt is missing" in capsys.readouterr().err
    flipped = tmp_path / "flipped" / "step-00000008"
    shutil.copytree(kd_run / "checkpoints" / "step-00000008", flipped)
    optim = sorted(flipped.glob("*optim_states.pt"))[0]
    data = bytearray(optim.read_bytes())
    data[-100] ^= 0x01
    optim.write_bytes(bytes(data))
    assert main(["export", str(flipped), str(tmp_path / "x")]) == 2
    assert f"{optim.name} does not match its checksum" in capsys.readouterr().err
    other = tmp_path / "other"
    make_student(str(demo_assets["teacher"]), str(other), encoder_layers=1, decoder_layers=1)
    capsys.readouterr()
    assert main(["export", str(kd_run), str(tmp_path / "y"), "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert "is not a checkpoint of the model in" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
