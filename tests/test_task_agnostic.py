"""Task-agnostic distillation on 2 ZeRO-3 ranks: a tiny BERT teacher and a 2-layer student read raw text
through masked LM, trained by MHA (MiniLMv2 relations) + HS (hidden states); the run resumes on the same
and on another number of ranks with the same masks and losses, and exports a *ForMaskedLM student."""

import json

import pytest
import torch

from ranks import ROOT, launch_run, launch_jobs, metrics, resumed_metrics

RECIPE = ROOT / "recipes" / "udagawa_mha_roberta.yaml"  # the shipped task-agnostic recipe, on tiny local models

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bert_run(demo_assets, tmp_path_factory):
    import datasets
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from distill.models.make_student import make_student

    root = tmp_path_factory.mktemp("task-agnostic")
    tok = AutoTokenizer.from_pretrained(demo_assets["tokenizer"])
    torch.manual_seed(0)
    # no dropout: a resume on another number of ranks then gives the uninterrupted run's losses exactly
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                               num_attention_heads=4, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    make_student(str(root / "bert"), str(root / "student"), encoder_layers=2)
    corpus = root / "corpus.txt"  # plain text, one paragraph a line, as a user's pre-training corpus
    train = datasets.load_dataset(str(demo_assets["data"]), split="train")
    corpus.write_text("\n".join(train["document"][:40]) + "\n")
    overrides = [f"teacher.path={root / 'bert'}", f"student.path={root / 'student'}", f"data.path={corpus}",
                 "data.name=null", "data.train_split=train", "data.eval_split=train[-5:]", "data.max_eval_samples=null",
                 "data.whole_word_masking=true", "data.block_length=64", "loss.w_hid=1.0", "loss.hidden.map=uniform_last",
                 "loss.hidden.stacks=encoder", "loss.relation.heads=4", "training.precision=fp32",
                 "training.max_steps=4", "training.save_every=2", "training.log_every=1", "training.eval_every=0",
                 "training.micro_batch_size=4", "training.gradient_accumulation_steps=1", "training.warmup_steps=0"]
    proc = launch_run([*overrides, f"training.output_dir={root / 'run'}"], recipe=RECIPE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


def test_mha_and_hs_train_on_masked_text_and_export_a_masked_lm(bert_run):
    from transformers import AutoModelForMaskedLM

    m = metrics(bert_run / "run")
    assert sorted(m) == [1, 2, 3, 4]
    for row in m.values():
        assert row["loss/rel/encoder_self"] > 0 and row["loss/hid/encoder"] > 0 and "loss/ce" not in row
    student = AutoModelForMaskedLM.from_pretrained(bert_run / "run" / "final")
    assert type(student).__name__ == "BertForMaskedLM" and student.config.num_hidden_layers == 2
    assert json.loads((bert_run / "run" / "eval_results.json").read_text())["eval/ce"] > 0


def test_a_resume_continues_the_same_masks_and_losses(bert_run):
    after = resumed_metrics(bert_run / "run", bert_run / "cut", "step-00000002")
    before = metrics(bert_run / "run")
    for step in (3, 4):
        for key in ("loss/total", "loss/rel", "loss/hid"):
            assert after[step][key] == pytest.approx(before[step][key], rel=1e-5), (step, key)


def test_a_resume_on_one_rank_continues_them_too(bert_run):
    import shutil

    cut = bert_run / "cut-1"
    shutil.copytree(bert_run / "run", cut)
    proc = launch_run([f"training.output_dir={cut}", "training.resume=step-00000002", "training.overwrite=true",
                       "training.micro_batch_size=8"], recipe=cut / "config.yaml", nproc=1)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    after, before = metrics(cut), metrics(bert_run / "run")
    for step in (3, 4):
        assert after[step]["loss/total"] == pytest.approx(before[step]["loss/total"], rel=1e-4), step


def test_every_objective_pretrains_a_model_with_no_teacher(demo_assets, tmp_path):
    """A user's own teacher from scratch: a tokenizer with sentinels, then random-init models pretrained by
    their own objective on a text file, CE only, on 2 ranks (one launch runs them in turn)."""
    import datasets

    from distill.models.from_scratch import init_model, train_tokenizer

    texts = datasets.load_dataset(str(demo_assets["data"]), split="train")["document"][:40]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n")
    train_tokenizer(texts, tmp_path / "tok", 600, sentinels=20)
    jobs = []
    for objective, family in (("mlm", "modernbert"), ("span_corruption", "t5"), ("infilling", "bart"),
                              ("causal", "llama")):
        model = init_model(tmp_path / family, tmp_path / "tok", family, layers=1, d_model=32, ffn=64, heads=4,
                           max_positions=64)
        jobs.append([str(ROOT / "recipes/demo/baseline.yaml"),
                     [f"student.path={model}", f"data.path={corpus}", "data.target_column=null", "data.source_column=text",
                      f"data.objective={objective}", "data.block_length=48", "data.eval_split=train[-4:]",
                      "data.max_train_samples=null", "training.max_steps=3", "training.log_every=1",
                      "training.eval_every=0", "training.save_every=3", "training.micro_batch_size=4",
                      "training.warmup_steps=0", f"training.output_dir={tmp_path / objective}"]])
    proc = launch_jobs(jobs, tmp_path / "jobs.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for objective in ("mlm", "span_corruption", "infilling", "causal"):
        m = metrics(tmp_path / objective)
        assert sorted(m) == [1, 2, 3] and all(0 < r["loss/ce"] < 20 for r in m.values()), objective
        assert json.loads((tmp_path / objective / "eval_results.json").read_text())["eval/ce"] > 0


def test_od_from_a_cache_of_every_token_equals_the_live_teacher(bert_run, capsys):
    """A masked-LM cache (the first epoch's masks, seed 42) read by example id on 2 ranks gives the live
    teacher's OD; a run that would go past the first epoch is refused before any model loads."""
    from transformers import AutoTokenizer

    from distill.train.launch import main

    vocab = len(AutoTokenizer.from_pretrained(bert_run / "bert"))
    corpus = bert_run / "corpus.txt"
    cache = bert_run / "cache"
    args = ["--model", bert_run / "bert", "--data", corpus, "--config", RECIPE, "--top-k", vocab, "--out", cache,
            "--seed", 42, "data.name=null", "data.train_split=train", "data.block_length=64",
            "data.whole_word_masking=true"]
    od = [f"teacher.path={bert_run / 'bert'}", f"student.path={bert_run / 'student'}", f"data.path={corpus}",
          "data.name=null", "data.train_split=train", "data.eval_split=null", "data.whole_word_masking=true",
          "data.block_length=64", "loss.w_rel=0", "loss.w_kd=1.0", "loss.w_ce=0.5", "training.precision=fp32",
          "training.max_steps=3", "training.log_every=1", "training.micro_batch_size=4",
          "training.gradient_accumulation_steps=1", "training.warmup_steps=0", "training.export=false",
          "training.seed=42"]
    # one launch: the cache, then a run from it and a run with the live teacher
    runs = launch_jobs([("distill", ["cache-teacher", *args]),
                        (RECIPE, [*od, "teacher.path=", f"teacher.cache={cache}",
                                  f"training.output_dir={bert_run / 'od-cached'}"]),
                        (RECIPE, [*od, f"training.output_dir={bert_run / 'od-live'}"])], bert_run / "od-jobs.json")
    assert runs.returncode == 0, runs.stdout[-2000:] + runs.stderr[-2000:]
    a, b = metrics(bert_run / "od-live"), metrics(bert_run / "od-cached")
    for step in (1, 2, 3):
        assert b[step]["loss/kd"] == pytest.approx(a[step]["loss/kd"], rel=5e-3), step  # fp16 logits in the cache
        assert b[step]["loss/ce"] == pytest.approx(a[step]["loss/ce"], rel=1e-4), step
    capsys.readouterr()
    code = main(["--config", str(RECIPE), *[o for o in od if not o.startswith("training.max_steps")],
                 "teacher.path=", f"teacher.cache={cache}", "training.max_steps=1000",
                 f"training.output_dir={bert_run / 'od-too-long'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "runs past the" in err[-1] and err[-1].startswith("distill: error: teacher.cache holds")
