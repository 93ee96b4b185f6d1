"""Encoder-only masked LMs through the objective: the output distribution (OD) and CE at the masked
positions through the fused head pass against a dense float64 reference computed from the models' own
logits, and MiniLMv2 relations + hidden states (MHA + HS) on BERT-style models, one process."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers import BertConfig, BertForMaskedLM, ModernBertConfig, ModernBertForMaskedLM, RobertaConfig, \
    RobertaForMaskedLM

from distill.config.loss import LossConfig
from distill.data.collate import IGNORE_INDEX, source_index, target_index
from distill.errors import DistillError
from distill.losses.objective import Objective
from distill.models.architectures import ENCODER_ONLY, model_kind
from distill.models.capture import CAPTURE_ATTENTION, FeatureModel, register_attention
from distill.models.loading import check_pair

register_attention()

COMMON = dict(vocab_size=80, intermediate_size=64, num_attention_heads=4, pad_token_id=1, max_position_embeddings=40,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
PAIRS = {
    "bert": (BertForMaskedLM, BertConfig, {}),
    "roberta": (RobertaForMaskedLM, RobertaConfig, {}),
    "modernbert": (ModernBertForMaskedLM, ModernBertConfig,
                   dict(global_attn_every_n_layers=2, local_attention=4, bos_token_id=0, eos_token_id=2, cls_token_id=0,
                        sep_token_id=2)),
}
MASK = 4


def _pair(family, student_width=32):
    model_cls, config_cls, extra = PAIRS[family]
    torch.manual_seed(0)
    make = lambda width, layers: model_cls(config_cls(**COMMON, **extra, hidden_size=width,  # noqa: E731
                                                      num_hidden_layers=layers, attn_implementation=CAPTURE_ATTENTION))
    teacher, student = make(48, 4).double().eval(), make(student_width, 2).double().eval()
    for model in (teacher, student):  # a non-zero head bias, so a missing one shows
        with torch.no_grad():
            model.get_output_embeddings().bias.normal_()
    return teacher, student


def _mlm_batch():
    """Two rows, one padded; some positions masked (an MLM collator's batch: labels at the predicted
    positions, aligned with the logits at the same position)."""
    original = torch.tensor([[0, 10, 11, 12, 13, 14, 15, 16, 2], [0, 20, 21, 22, 23, 2, 1, 1, 1]])
    predicted = torch.zeros_like(original, dtype=torch.bool)
    predicted[0, [2, 5, 6]] = True
    predicted[1, [1, 4]] = True
    input_ids = original.masked_fill(predicted, MASK)
    input_ids[0, 6] = 30  # 10%: a random token
    input_ids[1, 4] = 23  # 10%: unchanged
    labels = original.masked_fill(~predicted, IGNORE_INDEX)
    mask = (original != 1).long()
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "target_index": target_index(labels),
            "source_index": source_index(mask), "weight": torch.ones(2)}


def _forward(model, batch, features=True):
    return model(rows=batch["target_index"], features=features, input_ids=batch["input_ids"],
                 attention_mask=batch["attention_mask"])


@pytest.mark.parametrize("family", list(PAIRS))
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_od_and_ce_at_masked_positions_match_a_dense_float64_reference(family, divergence):
    teacher, student = _pair(family)
    assert model_kind(teacher.config) == model_kind(student.config) == ENCODER_ONLY
    cfg = LossConfig(w_ce=0.3, w_kd=0.7, temperature=2.0, divergence=divergence)
    objective = Objective(cfg, 10, student.config, teacher.config)
    batch = _mlm_batch()
    s_model, t_model = FeatureModel(student, objective.student_request), FeatureModel(teacher, objective.teacher_request)
    totals = torch.tensor([float(batch["target_index"].numel())] * len(objective.count_names), dtype=torch.float64)
    with torch.no_grad():
        t_out = _forward(t_model, batch)
    s_out = _forward(s_model, batch)
    total, terms, _ = objective(batch, s_out, t_out, True, totals)
    total.backward()
    fused_grad = student.get_output_embeddings().weight.grad.clone()
    student.zero_grad()

    # the reference: both models' full logits, every position, then the masked rows
    z_s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.reshape(-1, 80)
    with torch.no_grad():
        z_t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.reshape(-1, 80)
    rows = batch["target_index"]
    s, t = z_s[rows] / 2.0, z_t[rows] / 2.0
    if divergence == "forward_kl":
        kd = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)
    else:
        kd = (s.softmax(-1) * (s.log_softmax(-1) - t.log_softmax(-1))).sum(-1)
    kd = 4.0 * kd.mean()
    ce = F.cross_entropy(z_s[rows], batch["labels"].reshape(-1)[rows])
    assert_close(terms["kd"], kd.detach(), rtol=1e-10, atol=1e-12)
    assert_close(terms["ce"], ce.detach(), rtol=1e-10, atol=1e-12)
    reference = 0.3 * ce + 0.7 * kd
    assert_close(total.detach(), reference.detach(), rtol=1e-10, atol=1e-12)
    reference.backward()
    assert_close(fused_grad, student.get_output_embeddings().weight.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("family", list(PAIRS))
def test_relations_and_hidden_states_train_a_narrower_encoder(family):
    """MHA (MiniLMv2 Q/K/V relations at the teacher's upper-middle layer) + HS (uniform+last map, projected
    to the teacher's width) on a narrower student: finite, and the gradient reaches the student's layers."""
    teacher, student = _pair(family, student_width=16)
    cfg = LossConfig(w_ce=0.0, w_rel=1.0, w_hid=1.0)
    cfg.relation.heads = 4
    cfg.hidden.map, cfg.hidden.stacks, cfg.hidden.projection = "uniform_last", ["encoder"], True
    objective = Objective(cfg, 10, student.config, teacher.config)
    assert objective.count_names == ("source",)
    projections = objective.build_projections(torch.float64)
    s_model = FeatureModel(student, objective.student_request, "student", projections, objective.project)
    t_model = FeatureModel(teacher, objective.teacher_request, "teacher")
    batch = _mlm_batch()
    with torch.no_grad():
        t_out = _forward(t_model, batch)
    totals = torch.tensor([float(batch["source_index"].numel())], dtype=torch.float64)
    total, terms, _ = objective(batch, _forward(s_model, batch), t_out, True, totals)
    assert set(terms) >= {"rel", "rel/encoder_self", "hid", "hid/encoder"} and torch.isfinite(total)
    total.backward()
    grads = [p.grad for n, p in student.named_parameters() if "layer" in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert projections["hidden_encoder"].weight.grad.abs().sum() > 0


def test_encoder_only_pairs_with_encoder_only_only(tmp_path):
    from transformers import LlamaConfig

    bert = BertConfig(**COMMON, hidden_size=32, num_hidden_layers=2)
    llama = LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(DistillError, match="teacher is encoder-only but student is decoder-only"):
        check_pair(bert, llama, None, None)
    with pytest.raises(DistillError, match="loss.relation.sites 'decoder_self' needs a decoder, and the student has none"):
        cfg = LossConfig(w_ce=0.0, w_rel=1.0)
        cfg.relation.sites = ["decoder_self"]
        Objective(cfg, 10, bert, bert)


def test_attention_maps_of_a_sliding_window_layer_against_a_full_one_are_refused():
    _, config_cls, extra = PAIRS["modernbert"]
    make = lambda layers: config_cls(**COMMON, **extra, hidden_size=32, num_hidden_layers=layers)  # noqa: E731
    student, teacher = make(2), make(4)  # full, sliding | full, sliding, full, sliding
    cfg = LossConfig(w_ce=0.0, w_attn=1.0)
    cfg.attention.sites, cfg.attention.teacher_layer = ["encoder_self"], -2
    with pytest.raises(DistillError, match=r"student's encoder_self layer 1 \(sliding_attention\) with the "
                                           r"teacher's layer 2 \(full_attention\)"):
        Objective(cfg, 10, student, teacher)
    cfg.attention.teacher_layer = -1
    Objective(cfg, 10, student, teacher)


@pytest.mark.parametrize("family", list(PAIRS))
def test_export_writes_a_masked_lm_directory(family, tmp_path):
    from transformers import AutoModelForMaskedLM

    from distill.infer.export import export_student

    _, student = _pair(family)
    export_student(student.float(), None, tmp_path / "final")
    back = AutoModelForMaskedLM.from_pretrained(tmp_path / "final")
    assert back.config.architectures == [type(student).__name__]
    for (name, a), b in zip(student.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
