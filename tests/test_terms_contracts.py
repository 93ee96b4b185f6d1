"""A term's contract, end to end: a throwaway logit term registered inside the test (one class and the
register decorator, as the README's "Adding a loss term" says) gets its weight keys in YAML and on the
command line, is refused by ``check-config`` in one line with a teacher it declares it cannot read (a
top-K cache, a cross-tokenizer pair), computes its loss through the objective on a tiny model, and
leaves the registry as it was."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_terms_fakes import registered  # noqa: F401  (the fixture)
from torch.testing import assert_close
from transformers import BartConfig, BartForConditionalGeneration

from distill.cli import main
from distill.config.loss import TermWeight
from distill.config.parsing import load_config
from distill.data.collate import source_index, target_index
from distill.errors import DistillError
from distill.losses.divergences import crop_vocab
from distill.losses.fused_head import RowFn
from distill.losses.objective import Objective
from distill.losses.terms import TERMS, Term
from distill.models.capture import FeatureModel

KD = Path(__file__).resolve().parents[1] / "recipes/demo/kd.yaml"


def logit_l1(student_logits, teacher_logits):
    s, t = crop_vocab(student_logits, teacher_logits)
    return (s - t).abs().sum(-1)


@pytest.fixture
def l1_term(registered):  # noqa: F811
    @registered
    class LogitL1(Term):
        """``l1``: Σ|z_S − z_T| over the shared vocabulary, a mean over target tokens."""

        name = "l1"
        uses_logits = True

        def __init__(self, cfg, total_steps, student_config, teacher_config):
            super().__init__(cfg, total_steps, student_config, teacher_config)
            self.parts = {"l1": "target"}

        def row_values(self, labels, spans=None) -> dict[str, RowFn]:
            return {"l1": lambda s, t, rows: logit_l1(s, t)}
    return LogitL1


def check_config(capsys, *overrides):
    capsys.readouterr()
    code = main(["check-config", "--config", str(KD), *overrides])
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_new_terms_weight_keys_parse_from_yaml_and_the_command_line(l1_term, tmp_path):
    recipe = yaml.safe_load(KD.read_text())
    recipe["loss"].update(w_l1=0.5, w_l1_schedule="linear", w_l1_end=0.0)
    path = tmp_path / "l1.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cfg = load_config(path)
    assert cfg.loss.weights["l1"] == TermWeight(0.5, "linear", 0.0)
    assert load_config(path, ["loss.w_l1=0.25"]).loss.weights["l1"].value == 0.25
    assert cfg.flat()["loss.w_l1_schedule"] == "linear" and "l1" in cfg.loss.active_terms()
    with pytest.raises(DistillError, match="w_l1_end is set exactly when"):
        load_config(KD, ["loss.w_l1=1", "loss.w_l1_end=0.5"])
    with pytest.raises(DistillError, match=r"unknown config key 'loss.w_l2' \(did you mean 'loss.w_l1'\?\): the loss "
                                           r"terms are ce, kd, hid, attn, rel, mse, l1,"):
        load_config(KD, ["loss.w_l2=1"])


def test_check_config_refuses_what_a_new_term_declares_it_cannot_read(l1_term, capsys):
    assert not l1_term.top_k_teacher and not l1_term.across_tokenizers
    code, err = check_config(capsys, "loss.w_l1=1", "teacher.cache=/some/cache")
    assert code == 2 and len(err) == 1 and "loss.w_l1 compares the full logits" in err[0], err
    code, err = check_config(capsys, "loss.w_l1=1", "loss.cross_tokenizer=uld")
    assert code == 2 and len(err) == 1 and "loss.w_l1 compares logits token for token" in err[0], err
    # with a term that declares it can read them, the same settings pass
    l1_term.top_k_teacher = l1_term.across_tokenizers = True
    assert load_config(KD, ["loss.w_l1=1", "teacher.path=", "teacher.cache=/c"]).teacher_cache == "/c"
    assert load_config(KD, ["loss.w_l1=1", "loss.cross_tokenizer=uld"]).live_teacher


def test_a_new_term_computes_its_loss_through_the_objective_on_a_tiny_model(l1_term, tmp_path):
    torch.manual_seed(0)
    config = dict(vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, pad_token_id=1,
                  decoder_start_token_id=2, dropout=0.0)
    teacher, student = (BartForConditionalGeneration(BartConfig(**config)).eval() for _ in range(2))
    objective = Objective(load_config(KD, ["loss.w_ce=0", "loss.w_kd=0", "loss.w_l1=0.5"]).loss, 10,
                          student.config, teacher.config)
    assert [t.name for t in objective.terms] == ["l1"] and objective.needs_teacher
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 1, 1]])
    inputs = {"input_ids": ids, "attention_mask": (ids != 1).long(),
              "decoder_input_ids": torch.tensor([[2, 9, 10], [2, 9, 1]])}
    labels = torch.tensor([[9, 10, 3], [9, 3, -100]])
    batch = {**inputs, "labels": labels, "target_index": target_index(labels),
             "source_index": source_index(inputs["attention_mask"])}
    t_out = FeatureModel(teacher, objective.teacher_request, "teacher")(rows=batch["target_index"], **inputs)
    s_out = FeatureModel(student, objective.student_request, "student")(rows=batch["target_index"], **inputs)
    totals = torch.tensor(objective.counts(batch, True), dtype=torch.float32)
    total, terms, _ = objective(batch, s_out, t_out, True, totals)
    real = labels != -100
    with torch.no_grad():
        reference = logit_l1(student(**inputs).logits[real].double(), teacher(**inputs).logits[real].double()).mean()
    assert_close(terms["l1"].double(), reference, rtol=1e-5, atol=1e-5)
    assert_close(total.double(), 0.5 * reference, rtol=1e-5, atol=1e-5)
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.model.decoder.layers[0].fc1.weight.grad.abs().sum() > 0


def test_the_throwaway_term_left_the_registry():
    assert "l1" not in TERMS


def test_the_terms_import_no_settings():
    """The settings are checked against the registry (distill.config.loss imports it), so the terms and
    what they import must not import the settings back: that would be an import cycle."""
    code = ("import sys, distill.losses.terms; "
            "print(sorted(m for m in sys.modules if m.startswith('distill.config')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
