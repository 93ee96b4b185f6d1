"""Each loss term alone (``distill.losses.terms``): what it declares from the two model configs, what it
refuses, and its sums against float64 references; the logit MSE term (the README's worked example)
like the other losses; the registry; and a new term added by following the README's recipe."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from transformers import LlamaConfig
from test_terms_fakes import (STUDENT, TEACHER, V, all_terms, fake_output, logit_sums, logits_output, make_batch,
                              registered)

from distill.config.loss import LossConfig, weight_keys
from distill.errors import DistillError
from distill.losses.features import attention_log_probs, concat_heads, hidden_distance, relation_log_probs
from distill.losses.objective import Objective
from distill.losses.terms import TERMS, Term
from distill.losses.terms.base import layer_request, stack_index
from distill.losses.terms.mse import logit_mse

README = Path(__file__).resolve().parents[1] / "README.md"


def term_outputs(term, batch, seed=0):
    """(student, teacher) for one term, the student through freshly made projections."""
    torch.manual_seed(seed)
    projections = nn.ModuleDict({k: nn.Linear(i, o, bias=False, dtype=torch.float64)
                                 for k, (i, o) in term.projection_shapes.items()})
    student = fake_output(STUDENT, term.student_request, batch, seed, grad=True)
    teacher = fake_output(TEACHER, term.teacher_request, batch, seed + 1, grad=True)
    term.project(student.features, projections)
    return student, teacher, projections


def make(name, cfg=None):
    return TERMS[name](cfg or all_terms(), 10, STUDENT, None if name == "ce" else TEACHER)


def kl_rows(s_log, t_log, real):
    """Σ over the real query rows of the head-mean KL(t ‖ s), written the plain way (boolean masks)."""
    kl = (t_log.exp() * (t_log - s_log)).nan_to_num().sum(-1).mean(1)  # (B, Tq)
    return kl[real].sum()


# ---------------------------------------------------------------- the registry


def test_the_weights_follow_the_registry_and_docstrings_say_what_they_average():
    assert list(LossConfig().weights) == list(TERMS)
    assert list(weight_keys()) == [f"w_{name}{suffix}" for suffix in ("", "_schedule", "_end") for name in TERMS]
    for cls in TERMS.values():
        assert "mean over" in " ".join(cls.__doc__.split()), cls.__name__


def test_parts_requests_and_projections_from_the_configs():
    assert make("ce").parts == {"ce": "target_gold"} and not make("ce").needs_teacher
    assert make("kd").parts == {"kd": "target"} and make("mse").parts == {"mse": "target"}
    hid = make("hid")
    assert hid.parts == {"hid/encoder": "source", "hid/decoder": "target"}
    assert hid.pairs == {"encoder": [(1, 2), (2, 3)], "decoder": [(1, 2)]}  # uniform: 2 -> 3 and 1 -> 2 layers
    assert hid.student_request.hidden == {"encoder": (1, 2), "decoder": (1,)}
    assert hid.teacher_request.hidden == {"encoder": (2, 3), "decoder": (2,)}
    assert hid.projection_shapes == {"hidden_encoder": (16, 32), "hidden_decoder": (16, 32)}
    attn = make("attn")
    assert attn.parts == {"attn/encoder_self": "source", "attn/decoder_self": "target", "attn/decoder_cross": "target"}
    assert attn.student_request.attention == {"encoder_self": (1,), "decoder_self": (0,), "decoder_cross": (0,)}
    assert attn.teacher_request.attention == {"encoder_self": (2,), "decoder_self": (1,), "decoder_cross": (1,)}
    rel = make("rel")
    assert rel.parts == {"rel/encoder_self": "source", "rel/decoder_self": "target"}
    assert rel.teacher_request.attention == {"encoder_self": (1,), "decoder_self": (0,)}  # teacher layer -2


CAUSAL = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)


@pytest.mark.parametrize("name, change, student, message", [
    ("hid", lambda c: setattr(c.hidden, "projection", False), STUDENT, "needs loss.hidden.projection=true"),
    ("hid", lambda c: None, CAUSAL, "needs a encoder, and the student has none"),
    ("attn", lambda c: None, STUDENT.__class__(**{**STUDENT.to_dict(), "encoder_attention_heads": 2}),
     "head by head"),
    ("attn", lambda c: setattr(c.attention, "teacher_layer", 5), STUDENT, "indexes past the model's 3 layers"),
    ("rel", lambda c: setattr(c.relation, "heads", 3), STUDENT, "does not divide the student's"),
    ("rel", lambda c: setattr(c.relation, "metric", "mse"), STUDENT, "needs loss.relation.projection=true"),
])
def test_bad_settings_are_refused_from_the_configs(name, change, student, message):
    cfg = all_terms()
    change(cfg)
    with pytest.raises(DistillError, match=message):
        TERMS[name](cfg, 10, student, TEACHER)


def test_teacher_reading_the_student_encoder_refuses_encoder_features():
    cfg = LossConfig(w_ce=0.0, w_attn=1.0, teacher_uses_student_encoder=True)
    with pytest.raises(DistillError, match="same hidden size"):
        Objective(cfg, 10, STUDENT, TEACHER)
    with pytest.raises(DistillError, match="no encoder feature loss"):
        Objective(cfg, 10, TEACHER, TEACHER)
    cfg.attention.sites = ["decoder_self", "decoder_cross"]
    assert not Objective(cfg, 10, TEACHER, TEACHER).teacher_request.attention.get("encoder_self")


# ---------------------------------------------------------------- each term's sums against references


def test_cross_entropy_and_logit_terms_sum_over_target_tokens():
    batch = make_batch(1)
    real = batch["labels"] != -100
    cfg = all_terms(label_smoothing=0.1, temperature=2.0)
    s, t, _ = term_outputs(make("kd"), batch)
    ce = logit_sums(make("ce", cfg), batch, s, None)["ce"]
    assert_close(ce, F.cross_entropy(s.logits.reshape(-1, V), batch["labels"].reshape(-1), reduction="sum",
                                     label_smoothing=0.1), rtol=1e-12, atol=1e-12)
    p = torch.softmax(t.logits[..., :V] / 2.0, -1)
    q_log = torch.log_softmax(s.logits / 2.0, -1)
    kd = logit_sums(make("kd", cfg), batch, s, t)["kd"]
    assert_close(kd, 4.0 * (p * (p.log() - q_log)).sum(-1)[real].sum(), rtol=1e-12, atol=1e-12)
    mse = logit_sums(make("mse", cfg), batch, s, t)["mse"]
    assert_close(mse, (s.logits - t.logits[..., :V]).pow(2).sum(-1)[real].sum(), rtol=1e-12, atol=1e-12)
    (ce + kd + mse).backward()
    assert t.logits.grad is None and (s.logits.grad[~real] == 0).all() and s.logits.grad[real].abs().sum() > 0


@pytest.mark.parametrize("metric, normalize", [("mse", False), ("cosine", True)])
def test_hidden_term_sums_each_stack_over_its_tokens_and_pairs(metric, normalize):
    cfg = all_terms()
    cfg.hidden.metric, cfg.hidden.normalize = metric, normalize
    term, batch = make("hid", cfg), make_batch(2)
    s, t, projections = term_outputs(term, batch)
    got = term(batch, s, t)
    real = {"encoder": batch["attention_mask"].bool(), "decoder": batch["labels"] != -100}
    for stack, pairs in term.pairs.items():
        expected = 0.0
        for i, j in pairs:
            x, y = s.features.hidden[(stack, i)], t.features.hidden[(stack, j)]
            if normalize:
                x, y = F.layer_norm(x, (32,)), F.layer_norm(y, (32,))
            per_token = (x - y).pow(2).mean(-1) if metric == "mse" else 1 - F.cosine_similarity(x, y, dim=-1)
            expected = expected + per_token[real[stack]].sum()
        assert_close(got[f"hid/{stack}"], expected, rtol=1e-10, atol=1e-12)
    sum(got.values()).backward()
    assert all(p.grad.abs().sum() > 0 for p in projections.parameters())
    assert all(h.grad is None for h in t.features.hidden.values())


def test_attention_term_is_the_head_mean_kl_summed_over_query_rows():
    term, batch = make("attn"), make_batch(3)
    s, t, _ = term_outputs(term, batch)
    got = term(batch, s, t)
    for site, (i, j) in term.layers.items():
        a_s, a_t = s.features.attention[(site, i)], t.features.attention[(site, j)]
        s_log = attention_log_probs(a_s.query, a_s.key, a_s.keep, a_s.scaling)
        t_log = attention_log_probs(a_t.query, a_t.key, a_t.keep, a_t.scaling)
        real = batch["attention_mask"].bool() if site == "encoder_self" else batch["labels"] != -100
        assert_close(got[f"attn/{site}"], kl_rows(s_log, t_log, real), rtol=1e-10, atol=1e-12)
    sum(got.values()).backward()
    assert all(a.query.grad is None for a in t.features.attention.values())
    assert all(a.query.grad.abs().sum() > 0 for a in s.features.attention.values())


@pytest.mark.parametrize("metric", ["kl", "mse"])
def test_relation_term_sums_the_kinds_over_query_rows(metric):
    cfg = all_terms()
    cfg.relation.metric, cfg.relation.projection, cfg.relation.kinds = metric, metric == "mse", ["q", "v"]
    term, batch = make("rel", cfg), make_batch(4)
    s, t, projections = term_outputs(term, batch)
    got = term(batch, s, t)
    for site, (i, j) in term.layers.items():
        a_s, a_t = s.features.attention[(site, i)], t.features.attention[(site, j)]
        real = batch["attention_mask"].bool() if site == "encoder_self" else batch["labels"] != -100
        expected = 0.0
        for kind, attr in (("q", "query"), ("v", "value")):
            x_s, x_t = concat_heads(getattr(a_s, attr)), concat_heads(getattr(a_t, attr))
            if metric == "mse":
                per_token = (projections[f"rel_{site}_{kind}"](x_s) - x_t).pow(2).mean(-1)
                expected = expected + per_token[real].sum()
            else:
                expected = expected + kl_rows(relation_log_probs(x_s, 4, a_s.keep),
                                              relation_log_probs(x_t, 4, a_t.keep), real)
        assert_close(got[f"rel/{site}"], expected, rtol=1e-10, atol=1e-12)
    sum(got.values()).backward()
    assert all(p.grad.abs().sum() > 0 for p in projections.parameters())


# ---------------------------------------------------------------- the logit MSE term's math (the README example)


def ref_mse(s, t, mask):
    """Σ over the masked tokens of Σ_v (z_S − z_T)² over the shared vocabulary, python floats."""
    v = min(s.shape[-1], t.shape[-1])
    return sum(sum((float(s[b, i, k]) - float(t[b, i, k])) ** 2 for k in range(v))
               for b in range(s.shape[0]) for i in range(s.shape[1]) if mask[b, i])


def _logits(seed, vt=V + 3):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(3, 6, V, generator=g) * 3, torch.randn(3, 6, vt, generator=g) * 3
    mask = torch.rand(3, 6, generator=g) > 0.4
    mask[0] = False  # a fully padded row
    mask[1, 0] = True
    return s, t, mask


def idx(mask):
    return mask.reshape(-1).nonzero().squeeze(1)


def test_logit_mse_matches_reference_and_ignores_padding():
    s, t, mask = _logits(0)
    term = make("mse")
    batch = {"labels": torch.where(mask, 3, -100), "target_index": idx(mask)}
    got = logit_sums(term, batch, logits_output(s, idx(mask)), logits_output(t, idx(mask)))["mse"]
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref_mse(s, t, mask), rel=1e-5)
    got64 = logit_sums(term, batch, logits_output(s.double(), idx(mask)), logits_output(t.double(), idx(mask)))["mse"]
    assert got64.dtype == torch.float64 and got64.item() == pytest.approx(ref_mse(s, t, mask), rel=1e-12)
    assert logit_mse(s.bfloat16(), t.bfloat16()).shape == (3, 6)
    s2, t2 = s.clone(), t.clone()
    s2[~mask], t2[~mask] = 1e4, float("nan")  # padding rows are never selected
    assert_close(logit_sums(term, batch, logits_output(s2, idx(mask)), logits_output(t2, idx(mask)))["mse"], got,
                 rtol=0, atol=0)


def test_logit_mse_gradient_reaches_the_student_only_and_chunks_change_nothing():
    s, t, mask = (x.double() if x.is_floating_point() else x for x in _logits(1))
    t.requires_grad_(True)
    batch = {"labels": torch.where(mask, 3, -100), "target_index": idx(mask)}
    expected = 2 * (s - t.detach()[..., :V]) * mask[..., None]  # d/dz_S of Σ (z_S − z_T)²
    for budget_mib in (1e-4, 1e-3, 1.0):  # a row per chunk, a few, all at once
        x = s.clone().requires_grad_(True)
        logit_sums(make("mse"), batch, logits_output(x, idx(mask)), logits_output(t, idx(mask)), budget_mib)["mse"].backward()
        assert_close(x.grad, expected, rtol=1e-12, atol=1e-12)
    assert t.grad is None
    whole = s.clone().requires_grad_(True)
    none = torch.zeros(0, dtype=torch.long)
    empty = logit_sums(make("mse"), {"labels": batch["labels"], "target_index": none}, logits_output(whole, none),
                       logits_output(t, none))["mse"]
    empty.backward()
    assert empty.item() == 0.0 and (whole.grad == 0).all()


def test_mse_weight_has_a_schedule_like_the_others():
    cfg = LossConfig(w_ce=0.0, w_mse=1.0, w_mse_schedule="linear", w_mse_end=0.0)
    cfg.validate("loss")
    objective = Objective(cfg, 10, STUDENT, TEACHER)
    assert objective.weights() == {"mse": 1.0} and objective.count_names == ("target",)
    objective.step_end(5)
    assert objective.weights() == {"mse": pytest.approx(0.5)}
    with pytest.raises(DistillError, match="w_mse_end is set exactly when"):
        LossConfig(w_mse=1.0, w_mse_end=0.5).validate("loss")


# ---------------------------------------------------------------- a new term, by the README's recipe


def test_readme_example_is_the_real_mse_module():
    section = re.split(r"\n##+ ", README.read_text().split("\n### Adding a loss term\n", 1)[1], maxsplit=1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)
    source = (Path(__file__).resolve().parents[1] / "distill/losses/terms/mse.py").read_text().splitlines()
    assert code and all(line in source for block in code for line in block.splitlines() if line.strip())


def test_a_term_added_by_the_recipe_joins_the_objective(registered):
    @registered
    class EmbeddingMatch(Term):
        """``emb``: the MSE of the encoders' embedding outputs, a mean over source tokens."""

        name = "emb"

        def __init__(self, cfg, total_steps, student_config, teacher_config):
            super().__init__(cfg, total_steps, student_config, teacher_config)
            self.parts = {"emb": "source"}
            self.student_request = self.teacher_request = layer_request([("encoder", 0)])
            if student_config.d_model != teacher_config.d_model:
                raise DistillError("loss.w_emb needs equal widths")

        def __call__(self, batch, student, teacher):
            s, t = student.features.hidden[("encoder", 0)], teacher.features.hidden[("encoder", 0)]
            return {"emb": hidden_distance(s, t, stack_index(batch, "encoder"))}

    cfg = LossConfig(w_ce=0.0, w_kd=1.0, w_emb=2.0, w_emb_schedule="linear", w_emb_end=0.0)
    with pytest.raises(DistillError, match="needs equal widths"):
        Objective(cfg, 4, STUDENT, TEACHER)
    objective = Objective(cfg, 4, TEACHER, TEACHER)
    assert [t.name for t in objective.terms] == ["kd", "emb"] and objective.count_names == ("target", "source")
    assert objective.teacher_request.hidden == {"encoder": (0,)}
    batch = make_batch(5)
    student = fake_output(TEACHER, objective.student_request, batch, 0, grad=True)
    teacher = fake_output(TEACHER, objective.teacher_request, batch, 1)
    totals = torch.tensor(objective.counts(batch, True), dtype=torch.float64)
    total, terms, _ = objective(batch, student, teacher, True, totals)
    real = batch["attention_mask"].bool()
    diff = student.features.hidden[("encoder", 0)] - teacher.features.hidden[("encoder", 0)]
    assert_close(terms["emb"], diff.pow(2).mean(-1)[real].mean(), rtol=1e-12, atol=0)
    assert_close(total, terms["kd"] + 2.0 * terms["emb"], rtol=1e-12, atol=0)
    objective.step_end(2)
    assert objective.weights() == {"kd": 1.0, "emb": pytest.approx(1.0)}  # w_emb: linear 2 -> 0 over 4 steps
