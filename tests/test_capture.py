"""Feature capture against transformers' own outputs: hidden states against ``output_hidden_states``,
attention distributions rebuilt from captured Q/K against eager ``output_attentions`` on the same
weights, for BART, T5 (relative-position bias), LLaMA (rotary, grouped-query attention) and the masked
LMs BERT, RoBERTa and ModernBERT (rotary, sliding-window layers)."""

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    RobertaConfig,
    RobertaForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from distill.config.loss import LossConfig
from distill.data.collate import source_index, target_index
from distill.errors import DistillError
from distill.losses.features import attention_log_probs
from distill.losses.objective import Objective
from distill.models.capture import CAPTURE_ATTENTION, FeatureModel, Request, register_attention

register_attention()

BART = dict(vocab_size=64, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=1,
            decoder_start_token_id=2, dropout=0.0, attention_dropout=0.0)


ENCODER = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               pad_token_id=1, max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _models(cls, config, tmp_path):
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path)
    eager = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    capturing = cls.from_pretrained(tmp_path, attn_implementation=CAPTURE_ATTENTION).eval()
    return eager, capturing


def _batch(encoder_decoder: bool):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 1, 1, 1]])
    mask = (ids != 1).long()
    batch = {"input_ids": ids, "attention_mask": mask}
    if encoder_decoder:
        batch["decoder_input_ids"] = torch.tensor([[2, 11, 12, 13], [2, 11, 1, 1]])
    return batch


CASES = {
    "bart": (BartForConditionalGeneration, lambda: BartConfig(**BART),
             {"encoder": (0, 1, 3), "decoder": (2,)},
             {"encoder_self": (0, 2), "decoder_self": (1,), "decoder_cross": (0, 1)}),
    "mbart-style final norm": (BartForConditionalGeneration,
                               lambda: __import__("transformers").MBartConfig(**BART),
                               {"encoder": (3,), "decoder": (0, 2)}, {"decoder_cross": (1,)}),
    "t5": (T5ForConditionalGeneration,
           lambda: T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                            num_heads=4, pad_token_id=1, decoder_start_token_id=2, dropout_rate=0.0),
           {"encoder": (0, 2), "decoder": (1, 2)},
           {"encoder_self": (0, 1), "decoder_self": (0, 1), "decoder_cross": (1,)}),
    "bert": (BertForMaskedLM, lambda: BertConfig(**ENCODER), {"encoder": (0, 1, 3)}, {"encoder_self": (0, 2)}),
    "roberta": (RobertaForMaskedLM, lambda: RobertaConfig(**ENCODER), {"encoder": (2, 3)}, {"encoder_self": (1,)}),
    "modernbert": (ModernBertForMaskedLM,
                   lambda: ModernBertConfig(**ENCODER, global_attn_every_n_layers=2, local_attention=4, bos_token_id=0,
                                            eos_token_id=2, cls_token_id=0, sep_token_id=2),
                   {"encoder": (0, 1, 3)}, {"encoder_self": (0, 1)}),
    "llama-gqa": (LlamaForCausalLM,
                  lambda: LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=1),
                  {"decoder": (0, 1, 2)}, {"decoder_self": (0, 1)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_capture_matches_transformers_outputs(case, tmp_path):
    cls, make_config, hidden, attention = CASES[case]
    if case.startswith("mbart"):
        from transformers import MBartForConditionalGeneration as cls
    config = make_config()
    eager, capturing = _models(cls, config, tmp_path)
    batch = _batch(config.is_encoder_decoder)
    wrapped = FeatureModel(capturing, Request(hidden, attention), "student")
    with torch.no_grad():
        reference = eager(**batch, output_hidden_states=True, output_attentions=True)
        out = wrapped(features=True, **batch)
        logits = out.head.logits(out.hidden)
    features = out.features
    # padding rows are never read (ModernBERT's eager and SDPA paths differ there)
    real = (batch.get("decoder_input_ids", batch["input_ids"]) != 1).reshape(-1)
    torch.testing.assert_close(logits[real], reference.logits.reshape(logits.shape)[real], atol=1e-5, rtol=1e-4)

    encoder_only = not config.is_encoder_decoder and "encoder" in hidden
    tuples = {"encoder": reference.hidden_states if encoder_only else getattr(reference, "encoder_hidden_states", None),
              "decoder": getattr(reference, "decoder_hidden_states", None) or reference.hidden_states}
    tokens = {"encoder": batch["attention_mask"].bool(),
              "decoder": batch.get("decoder_input_ids", batch["input_ids"]) != 1}
    for stack, indices in hidden.items():
        for i in indices:
            torch.testing.assert_close(features.hidden[(stack, i)][tokens[stack]], tuples[stack][i][tokens[stack]],
                                       atol=1e-5, rtol=1e-4)

    maps = {"encoder_self": reference.attentions if encoder_only else getattr(reference, "encoder_attentions", None),
            "decoder_self": getattr(reference, "decoder_attentions", None) or reference.attentions,
            "decoder_cross": getattr(reference, "cross_attentions", None)}
    rows = {"encoder_self": batch["attention_mask"].bool(),
            "decoder_self": (batch.get("decoder_input_ids", batch["input_ids"]) != 1),
            "decoder_cross": batch.get("decoder_input_ids", batch["input_ids"]) != 1}
    for site, layers in attention.items():
        for layer in layers:
            a = features.attention[(site, layer)]
            probs = attention_log_probs(a.query, a.key, a.keep, a.scaling, a.position_bias).exp()
            expected = maps[site][layer]
            valid = rows[site]
            torch.testing.assert_close(probs.permute(0, 2, 1, 3)[valid], expected.permute(0, 2, 1, 3)[valid],
                                       atol=1e-5, rtol=1e-4)


def test_capture_records_only_when_asked(tmp_path):
    _, model = _models(BartForConditionalGeneration, BartConfig(**BART), tmp_path)
    wrapped = FeatureModel(model, Request({"encoder": (1,)}, {"encoder_self": (0,)}), "student")
    out = wrapped(**_batch(True))
    assert out.features is None and out.hidden.shape == (2 * 4, BART["d_model"])
    generated = model.generate(input_ids=_batch(True)["input_ids"], max_new_tokens=3, do_sample=False)
    assert generated.shape[0] == 2


def test_sdpa_model_is_refused_for_attention(tmp_path):
    BartForConditionalGeneration(BartConfig(**BART)).save_pretrained(tmp_path)
    model = BartForConditionalGeneration.from_pretrained(tmp_path)  # plain sdpa: nothing would be recorded
    with pytest.raises(DistillError, match="attn_implementation='distill_sdpa'"):
        FeatureModel(model, Request({}, {"encoder_self": (0,)}), "teacher")


def _pair(tmp_path, student_overrides):
    torch.manual_seed(0)
    teacher = BartForConditionalGeneration(BartConfig(**BART))
    student = BartForConditionalGeneration(BartConfig(**{**BART, **student_overrides}))
    for model, name in ((teacher, "t"), (student, "s")):
        model.save_pretrained(tmp_path / name)
    load = lambda name: BartForConditionalGeneration.from_pretrained(  # noqa: E731
        tmp_path / name, attn_implementation=CAPTURE_ATTENTION)
    return load("t"), load("s")


def _wrap(objective, student, teacher):
    s_model = FeatureModel(student, objective.student_request, "student",
                           objective.build_projections(torch.float32), objective.project)
    return s_model, FeatureModel(teacher, objective.teacher_request, "teacher").eval()


def _step(objective, s_model, t_model, batch):
    """Teacher and student forward, then the objective: (total, terms, student features, teacher features)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
    batch = {**batch, "target_index": target_index(batch["labels"]), "source_index": source_index(batch["attention_mask"])}
    with torch.no_grad():
        t_out = t_model(rows=batch["target_index"], features=True, **inputs)
    s_out = s_model(rows=batch["target_index"], features=True, **inputs)
    totals = torch.tensor(objective.counts(batch, True), dtype=torch.float32)  # the step is this one batch
    total, terms, _ = objective(batch, s_out, t_out, True, totals)
    return total, terms, s_out.features, t_out.features


LABELS = torch.tensor([[11, 12, 13, 3], [11, 3, -100, -100]])


def test_gradients_reach_student_and_projections_only(tmp_path):
    """Every feature term at once, across widths (projections) and head counts (relations)."""
    teacher, student = _pair(tmp_path, dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32,
                                            decoder_ffn_dim=32, encoder_attention_heads=4, decoder_attention_heads=4))
    cfg = LossConfig(w_ce=1.0, w_kd=1.0, w_hid=1.0, w_attn=1.0, w_rel=1.0)
    cfg.hidden.map, cfg.hidden.projection = "last", True
    cfg.relation.heads = 4
    cfg.relation.sites = ["encoder_self", "decoder_self"]
    objective = Objective(cfg, 10, student.config, teacher.config)
    assert set(objective.projection_shapes) == {"hidden_encoder", "hidden_decoder"}
    s_model, t_model = _wrap(objective, student, teacher)
    total, terms, _, _ = _step(objective, s_model.train(), t_model, {**_batch(True), "labels": LABELS})
    assert {"ce", "kd", "hid", "attn", "rel", "hid/encoder", "attn/decoder_cross", "rel/decoder_self"} <= set(terms)
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in s_model.projections.parameters())
    assert student.model.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_padding_never_changes_the_feature_losses(tmp_path):
    teacher, student = _pair(tmp_path, dict(encoder_layers=2, decoder_layers=1))
    cfg = LossConfig(w_ce=0.0, w_hid=1.0, w_attn=1.0, w_rel=1.0)
    cfg.hidden.map, cfg.relation.heads = "uniform", 8
    objective = Objective(cfg, 10, student.config, teacher.config)
    s_model, t_model = _wrap(objective, student, teacher)
    losses = lambda batch: _step(objective, s_model.eval(), t_model, batch)[1]  # noqa: E731

    short = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "decoder_input_ids": torch.tensor([[2, 11]]), "labels": torch.tensor([[11, 3]])}
    padded = {"input_ids": torch.tensor([[5, 6, 7, 1, 1]]), "attention_mask": torch.tensor([[1, 1, 1, 0, 0]]),
              "decoder_input_ids": torch.tensor([[2, 11, 1]]), "labels": torch.tensor([[11, 3, -100]])}
    a, b = losses(short), losses(padded)
    assert set(a) == set(b) and {"hid", "attn", "rel"} <= set(a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides, student, message", [
    ({"w_attn": 1.0}, dict(encoder_attention_heads=2, decoder_attention_heads=2), "head by head"),
    ({"w_rel": 1.0, "relation": {"heads": 5}}, {}, "does not divide"),
    ({"w_hid": 1.0, "hidden": {"map": "last"}}, dict(d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32),
     "needs loss.hidden.projection=true"),
    ({"w_attn": 1.0, "attention": {"teacher_layer": 7}}, {}, "indexes past the model's 3 layers"),
    ({"w_hid": 1.0, "hidden": {"map": "custom", "teacher_layers": [0, 9]}}, dict(encoder_layers=2),
     "indexes past the teacher's 3 layers"),
    ({"w_hid": 1.0}, {}, "needs a student made by layer copy"),
])
def test_bad_feature_settings_are_refused_from_configs(overrides, student, message):
    from distill.config.parsing import _build

    cfg = _build(LossConfig, {"w_ce": 0.0, **overrides}, "loss.")
    with pytest.raises(DistillError, match=message):
        Objective(cfg, 10, BartConfig(**{**BART, **student}), BartConfig(**BART))


def test_attention_loss_refused_for_a_model_without_sdpa():
    from transformers import FSMTConfig

    config = FSMTConfig(src_vocab_size=64, tgt_vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4, langs=["en", "de"])
    with pytest.raises(DistillError, match="cannot be hooked"):
        Objective(LossConfig(w_ce=0.0, w_attn=1.0), 10, config, config)


def test_direct_minilm_projects_student_qkv_to_the_teacher_width(tmp_path):
    teacher, student = _pair(tmp_path, dict(d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32))
    cfg = LossConfig(w_ce=0.0, w_rel=1.0)
    cfg.relation.metric, cfg.relation.projection, cfg.relation.kinds = "mse", True, ["q", "v"]
    objective = Objective(cfg, 10, student.config, teacher.config)
    assert objective.projection_shapes == {"rel_encoder_self_q": (16, 32), "rel_encoder_self_v": (16, 32)}
    s_model, t_model = _wrap(objective, student, teacher)
    batch = {**_batch(True), "labels": LABELS}
    total, terms, s_feats, t_feats = _step(objective, s_model, t_model, batch)
    # the term is the plain MSE of the projected student queries/values against the teacher's, real tokens only
    rows = batch["attention_mask"].bool()
    expected = 0.0
    for kind in ("q", "v"):
        attr = {"q": "query", "v": "value"}[kind]
        s_x = s_model.projections[f"rel_encoder_self_{kind}"](
            getattr(s_feats.attention[("encoder_self", 2)], attr).transpose(1, 2).flatten(2))
        t_x = getattr(t_feats.attention[("encoder_self", 1)], attr).transpose(1, 2).flatten(2)
        expected = expected + ((s_x - t_x)[rows] ** 2).mean()
    torch.testing.assert_close(terms["rel"], expected)
    total.backward()
    assert all(p.grad is not None for p in s_model.projections.parameters())


def test_relations_use_the_keys_the_model_attends_with(tmp_path):
    """LLaMA with grouped-query attention: the captured keys are k_proj's output after the rotary
    embedding, with 2 key-value heads (not repeated to 4), so K-K relations see the real keys."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from distill.losses.features import concat_heads, relation_log_probs

    cls, make_config, _, _ = CASES["llama-gqa"]
    _, model = _models(cls, make_config(), tmp_path)
    batch = _batch(False)
    seen = {}
    layer = model.model.layers[1].self_attn
    hooks = [layer.k_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o)),
             layer.q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o)),
             layer.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("rope", kw["position_embeddings"]),
                                             with_kwargs=True)]
    wrapped = FeatureModel(model, Request({}, {"decoder_self": (1,)}), "student")
    with torch.no_grad():
        features = wrapped(features=True, **batch).features
    for h in hooks:
        h.remove()
    b, t, _ = seen["k"].shape
    cos, sin = seen["rope"]
    q = seen["q"].view(b, t, 4, 8).transpose(1, 2)
    k = seen["k"].view(b, t, 2, 8).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    captured = features.attention[("decoder_self", 1)]
    assert captured.key.shape == (2, 2, 6, 8)
    torch.testing.assert_close(captured.key, k)
    torch.testing.assert_close(captured.query, q)
    # the K-K relation over 4 relation heads of the 16-wide key (2 heads x 8), written the plain way
    keep = captured.keep
    rel = relation_log_probs(concat_heads(captured.key), 4, keep).exp()
    x = k.transpose(1, 2).reshape(b, t, 16)
    for bi in range(b):
        for a in range(4):
            xa = x[bi, :, 4 * a:4 * a + 4]
            scores = xa @ xa.T / 2.0
            scores = scores.masked_fill(~keep[bi if keep.shape[0] > 1 else 0, 0], float("-inf"))
            torch.testing.assert_close(rel[bi, a][keep[bi if keep.shape[0] > 1 else 0, 0].any(-1)],
                                       torch.softmax(scores, -1)[keep[bi if keep.shape[0] > 1 else 0, 0].any(-1)])
