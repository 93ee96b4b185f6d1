"""Every recipe in recipes/ validates as shipped, and runs a few steps with 2 ranks under ZeRO-3 on tiny
local models through command-line overrides (BART recipes on a tiny BART pair, T5 recipes on a tiny
T5 teacher and a narrower random-init student)."""

import json
import math
from pathlib import Path

import pytest
import torch

import ranks

from distill.config.parsing import load_config

ROOT = Path(__file__).parents[1]
# Training recipes; finetune_*.yaml are `distill finetune` recipes (tests/test_finetune.py checks them).
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml") if not p.name.startswith("finetune_"))
# What each recipe must log, beyond loss/total: its method, term by term.
TERMS = {
    "distilbart_cnn_sft.yaml": {"ce"}, "distilbart_xsum_sft.yaml": {"ce"},
    "distilbart_cnn_pl.yaml": {"ce"}, "distilbart_xsum_pl.yaml": {"ce"},
    "distilbart_cnn_kd.yaml": {"ce", "kd"},
    "distilbart_xsum_kd.yaml": {"ce", "kd", "hid", "hid/decoder"},
    "distilbart_xsum_gkd.yaml": {"kd"},
    "miniend_d.yaml": {"kd", "attn", "attn/decoder_self", "attn/decoder_cross"},
    "miniend_e.yaml": {"kd", "attn", "attn/encoder_self", "attn/decoder_self"},
    "udagawa_od.yaml": {"kd"},
    "udagawa_hs.yaml": {"hid", "hid/encoder", "hid/decoder"},
    "udagawa_mha.yaml": {"rel", "rel/encoder_self", "rel/decoder_self"},
    "udagawa_od_roberta.yaml": {"kd"},
    "udagawa_hs_roberta.yaml": {"hid", "hid/encoder"},
    "udagawa_mha_roberta.yaml": {"rel", "rel/encoder_self"},
    "udagawa_mha_xlmr.yaml": {"rel", "rel/encoder_self"},
    "miniend_d_pretrain.yaml": {"kd", "attn", "attn/decoder_self", "attn/decoder_cross"},
    "miniend_e_pretrain.yaml": {"kd", "attn", "attn/encoder_self", "attn/decoder_self"},
    "taid_t5_3b.yaml": {"ce", "kd", "rel", "rel/encoder_self"},
    "llama_kd.yaml": {"ce", "kd"},
    "llama_to_qwen_hybrid.yaml": {"ce", "kd", "kd/shared"},  # run here on one tokenizer: all shared; no ULD spans
    "llama_minilmv2.yaml": {"rel", "rel/decoder_self"},
    "qwen_gkd.yaml": {"kd"},
}
DECODER_ONLY = ("llama", "qwen")


def test_every_recipe_is_covered():
    assert sorted(TERMS) == RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_validates_as_shipped(recipe):
    cfg = load_config(ROOT / "recipes" / recipe)
    assert cfg.student.path and cfg.data.path
    for term in TERMS[recipe]:
        assert cfg.loss.weights[term.split("/")[0]].active, (recipe, term)


@pytest.fixture(scope="module")
def t5_pair(demo_assets):
    """A 2-2 T5 teacher on the demo tokenizer and a 1-1 student at half its width."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from distill.models.make_student import make_student

    root = demo_assets["root"]
    teacher, student = root / "t5-teacher", root / "t5-student"
    if not student.exists():
        tok = AutoTokenizer.from_pretrained(demo_assets["tokenizer"])
        config = T5Config(vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                          num_heads=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          decoder_start_token_id=tok.pad_token_id)
        T5ForConditionalGeneration(config).save_pretrained(teacher)
        tok.save_pretrained(teacher)
        make_student(str(teacher), str(student), encoder_layers=1, decoder_layers=1, hidden_size=32,
                     num_heads=4, ffn_size=64)
    return teacher, student


@pytest.fixture(scope="module")
def decoder_pairs(demo_assets):
    """4-layer LLaMA-style and Qwen2-style teachers (grouped-query attention) on the demo tokenizer, and
    2-layer students made from them by layer copy."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from distill.models.make_student import make_student

    root = demo_assets["root"]
    pairs = {}
    tok = AutoTokenizer.from_pretrained(demo_assets["tokenizer"])
    common = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    for name, config, cls in (("llama", LlamaConfig(**common), LlamaForCausalLM),
                              ("qwen", Qwen2Config(**common), Qwen2ForCausalLM)):
        teacher, student = root / f"{name}-teacher", root / f"{name}-student"
        if not student.exists():
            cls(config).save_pretrained(teacher)
            tok.save_pretrained(teacher)
            make_student(str(teacher), str(student), decoder_layers=2)
        pairs[name] = (teacher, student)
    return pairs


@pytest.fixture(scope="module")
def text_pairs(demo_assets):
    """For the task-agnostic recipes, which read raw text through their teacher's objective: a 4-layer
    RoBERTa-style masked LM on the demo tokenizer with a 2-layer student by layer copy, and a 2-2 T5 on a
    tokenizer with T5's sentinels with a 1-1 student at half its width."""
    import datasets
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM, T5Config, T5ForConditionalGeneration

    from distill.models.from_scratch import train_tokenizer
    from distill.models.make_student import make_student

    root = demo_assets["root"]
    tok = AutoTokenizer.from_pretrained(demo_assets["tokenizer"])
    roberta, roberta_student = root / "roberta-teacher", root / "roberta-student"
    if not roberta_student.exists():
        RobertaForMaskedLM(RobertaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, max_position_embeddings=130,
                                         pad_token_id=tok.pad_token_id)).save_pretrained(roberta)
        tok.save_pretrained(roberta)
        make_student(str(roberta), str(roberta_student), encoder_layers=2)
    t5, t5_student = root / "t5-span-teacher", root / "t5-span-student"
    if not t5_student.exists():
        texts = datasets.load_dataset(str(demo_assets["data"]), split="train")["document"]
        span_tok = train_tokenizer(texts, root / "t5-span-tokenizer", 600, sentinels=20)
        T5ForConditionalGeneration(T5Config(
            vocab_size=len(span_tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
            pad_token_id=span_tok.pad_token_id, eos_token_id=span_tok.eos_token_id,
            decoder_start_token_id=span_tok.pad_token_id)).save_pretrained(t5)
        span_tok.save_pretrained(t5)
        make_student(str(t5), str(t5_student), encoder_layers=1, decoder_layers=1, hidden_size=32, num_heads=4,
                     ffn_size=64)
    return {"mlm": (roberta, roberta_student), "span_corruption": (t5, t5_student)}


@pytest.fixture(scope="module")
def recipe_runs(demo_assets, t5_pair, decoder_pairs, text_pairs, tmp_path_factory):
    from distill.models.make_student import make_student

    out = tmp_path_factory.mktemp("recipes")
    bart_student = out / "bart-student"
    make_student(str(demo_assets["teacher"]), str(bart_student), decoder_layers=1)
    common = [f"data.path={demo_assets['data']}", "data.name=null", "data.source_column=document",
              "data.max_source_length=64", "data.max_target_length=24", "data.train_split=train",
              "data.eval_split=validation", "loss.on_policy_max_new_tokens=6",
              "training.precision=fp32", "training.micro_batch_size=4", "training.gradient_accumulation_steps=1",
              "training.max_steps=3", "training.warmup_steps=0", "training.log_every=1", "training.save_every=3",
              "training.eval_every=0", "data.max_eval_samples=8", "data.max_train_samples=32"]
    jobs = []
    for recipe in RECIPES:
        family = recipe.split("_")[0]
        teacher, student = (decoder_pairs[family] if family in DECODER_ONLY else
                            (demo_assets["teacher"], bart_student) if family == "distilbart" else t5_pair)
        shipped = load_config(ROOT / "recipes" / recipe)
        models = [f"student.path={student}"]
        if shipped.data.objective is not None:  # raw text through the teacher's objective
            teacher, student = text_pairs[shipped.data.objective]
            models = [f"student.path={student}", "data.block_length=48", "loss.relation.heads=4"]
        if shipped.teacher is not None:
            models.append(f"teacher.path={teacher}")
        if shipped.data.target_column is not None:  # plain-text recipes stay plain text
            models.append("data.target_column=summary")
        if shipped.loss.on_policy_fraction:  # enough micro-batches for both kinds to come up
            models.append("training.gradient_accumulation_steps=4")
        jobs.append([str(ROOT / "recipes" / recipe), [*common, *models, f"training.output_dir={out / recipe}"]])
    # the relation recipe on the Qwen2-style pair too (its attention has q/k/v biases)
    qwen_teacher, qwen_student = decoder_pairs["qwen"]
    jobs.append([str(ROOT / "recipes/llama_minilmv2.yaml"),
                 [*common, f"teacher.path={qwen_teacher}", f"student.path={qwen_student}",
                  f"training.output_dir={out / 'qwen_minilmv2'}"]])
    (out / "jobs.json").write_text(json.dumps(jobs))
    proc = ranks.launch(ROOT / "tests/scripts/run_recipes.py", [out / "jobs.json"], timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.integration
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_a_few_steps(recipe, recipe_runs):
    run = recipe_runs / recipe
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for row in steps:
        for term in TERMS[recipe]:
            assert math.isfinite(row[f"loss/{term}"]), (recipe, term, row)
        for term in ("ce", "kd", "hid", "attn", "rel"):
            assert (f"loss/{term}" in row) == (term in TERMS[recipe]), (recipe, term)
    assert (run / "final" / "model.safetensors").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000003"


@pytest.mark.integration
def test_weights_and_schedules_are_logged(recipe_runs):
    rows = [json.loads(line) for line in (recipe_runs / "taid_t5_3b.yaml" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/total" in r]
    assert all(r["weight/ce"] == 0.1 and r["weight/kd"] == 1.0 for r in steps)
    rel = [r["weight/rel"] for r in steps]  # cosine from 1 to 0 over the 3 steps
    assert rel[0] > rel[1] > rel[2] >= 0.0 and rel[0] <= 1.0
    lam = [r["schedule/taid_lambda"] for r in steps]
    assert 0.1 <= lam[0] < lam[1] < lam[2] <= 1.0


@pytest.mark.integration
def test_frozen_parts_stay_as_initialised(recipe_runs):
    """distilBART recipes freeze embeddings and encoder: the export keeps them bit for bit."""
    from safetensors.torch import load_file

    init = load_file(recipe_runs / "bart-student" / "model.safetensors")
    final = load_file(recipe_runs / "distilbart_cnn_sft.yaml" / "final" / "model.safetensors")
    frozen = [k for k in init if k.startswith("model.encoder.") or "embed_tokens" in k or "embed_positions" in k
              or k == "model.shared.weight"]
    trained = [k for k in init if k.startswith("model.decoder.layers.")]
    assert frozen and trained
    for key in frozen:
        assert torch.equal(init[key], final[key]), key
    assert any(not torch.equal(init[k], final[k]) for k in trained)


@pytest.mark.integration
def test_projections_are_trained_but_not_exported(recipe_runs):
    from safetensors.torch import load_file
    from transformers import AutoModelForSeq2SeqLM

    run = recipe_runs / "udagawa_hs.yaml"
    exported = load_file(run / "final" / "model.safetensors")
    assert not any("projection" in k for k in exported)
    model = AutoModelForSeq2SeqLM.from_pretrained(run / "final")
    assert model.config.d_model == 32 and model.config.to_dict().get("_attn_implementation") in (None, "sdpa")
    # the checkpoint keeps them, beside the model, as trainable parameters of the student's optimizer
    state = torch.load(run / "checkpoints" / "step-00000003" / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    shapes = state["param_shapes"][0]
    assert tuple(shapes["projections.hidden_encoder.weight"]) == (64, 32)
    assert "projections.hidden_decoder.weight" in shapes


@pytest.mark.integration
def test_schedules_reach_tensorboard(recipe_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(recipe_runs / "taid_t5_3b.yaml" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("schedule/taid_lambda", "weight/rel", "weight/kd", "weight/ce", "loss/rel", "loss/rel/encoder_self",
                "agreement/top1"):
        assert tag in tags and len(acc.Scalars(tag)) == 3, tag


@pytest.mark.integration
def test_decoder_only_students_export_reload_and_evaluate(recipe_runs, demo_assets, tmp_path):
    from transformers import AutoModelForCausalLM

    from distill.cli import main

    rows = [json.loads(line) for line in (recipe_runs / "qwen_gkd.yaml" / "metrics.jsonl").read_text().splitlines()]
    shares = [r["train/on_policy_share"] for r in rows if "train/on_policy_share" in r]
    assert shares and 0 < sum(shares) / len(shares) < 1  # on-policy and gold micro-batches both ran
    rows = [json.loads(line) for line in (recipe_runs / "qwen_minilmv2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/rel/decoder_self" in r] == [1, 2, 3]
    for recipe in ("llama_kd.yaml", "qwen_gkd.yaml", "llama_minilmv2.yaml", "qwen_minilmv2"):
        final = recipe_runs / recipe / "final"
        model = AutoModelForCausalLM.from_pretrained(final)
        assert model.config.num_hidden_layers == 2
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(recipe_runs / "llama_kd.yaml" / "final"), "--model",
                 str(recipe_runs / "qwen_gkd.yaml" / "final"), "--data", str(demo_assets["data"]), "--split", "test",
                 "--out", str(out), "--max-new-tokens", "6", "--batch-size", "3", "--bootstrap-samples", "20"]) == 0
    results = json.loads((out / "results.json").read_text())
    for row in results.values():
        assert row["n"] == 8 and row["perplexity"] > 1 and math.isfinite(row["perplexity"])
        assert 0 <= row["rougeL"] <= 100
    assert "perplexity" in (out / "results.md").read_text()


@pytest.mark.integration
def test_encoder_decoder_students_sample_their_own_summaries(recipe_runs):
    """distilBART GKD: on-policy and gold micro-batches both ran on the BART pair under ZeRO-3, and
    the run scored the student's summaries with ROUGE and exported the best one."""
    run = recipe_runs / "distilbart_xsum_gkd.yaml"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    shares = [r["train/on_policy_share"] for r in rows if "train/on_policy_share" in r]
    assert shares and 0 < sum(shares) / len(shares) < 1
    final = [r for r in rows if "eval/rouge2" in r]
    assert final and all(math.isfinite(r["eval/rouge2"]) for r in final)
    assert json.loads((run / "best.json").read_text())["metric"] == "eval/rouge2"
    assert (run / "best" / "model.safetensors").exists()
