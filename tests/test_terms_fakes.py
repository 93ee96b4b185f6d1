"""Shared by the tests/test_terms*.py files (no tests here): two tiny model configs, random batches
carrying the collator's flat indices, and hand-made model outputs (logits and captured features) for
any request, so the objective runs without a model; and the ``registered`` fixture, which registers a
term for one test.

A fake output's logits are random; its ``Output`` is their target rows with an identity head (the
head of the real models is tested in tests/test_fused_head.py), so the references are written
directly in terms of ``logits``."""

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import Tensor, nn
from transformers import BartConfig

from distill.config.loss import LossConfig
from distill.losses.fused_head import RowSum, Side, head_pass
from distill.losses.objective import Output
from distill.models.lm_head import Head
from distill.losses.terms.base import SITE_STACK, TERMS, register
from distill.models.architectures import attention_dims
from distill.models.capture import AttentionInputs, Features
from distill.models.loading import hidden_size

V = 11  # the student's vocabulary; the teacher's head has 3 padding rows more

_BART = dict(encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4,
             pad_token_id=1, decoder_start_token_id=2)
TEACHER = BartConfig(vocab_size=V + 3, d_model=32, encoder_layers=3, decoder_layers=2, **_BART)
STUDENT = BartConfig(vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=1, **_BART)


def term_weights() -> dict[str, float]:
    """A distinct weight for every registered term: 0.1, 0.2, ... in the registry's order."""
    return {name: (i + 1) / 10 for i, name in enumerate(TERMS)}


def all_terms(**settings) -> LossConfig:
    """Every registered term at once (``term_weights``), across widths (projections) and depths."""
    cfg = LossConfig(**{f"w_{name}": w for name, w in term_weights().items()}, **settings)
    cfg.hidden.map, cfg.hidden.projection = "uniform", True
    cfg.relation.heads = 4
    cfg.relation.sites = ["encoder_self", "decoder_self"]
    return cfg


@pytest.fixture
def registered():
    """Register a term for one test (``@registered`` on its class); the registry is left as it was."""
    added = []

    def add(cls):
        added.append(register(cls))
        return cls
    yield add
    for cls in added:
        TERMS.pop(cls.name)


def with_indices(batch: dict) -> dict:
    """The collator's ``target_index`` and ``source_index``."""
    return {**batch, "target_index": (batch["labels"].reshape(-1) != -100).nonzero().squeeze(1),
            "source_index": (batch["attention_mask"].reshape(-1) == 1).nonzero().squeeze(1)}


def make_batch(seed: int, b: int = 5, t_enc: int = 7, t_dec: int = 6, enc_lengths=None, dec_lengths=None) -> dict:
    """Right-padded rows of random lengths (a row may have no target at all)."""
    g = torch.Generator().manual_seed(seed)
    enc = torch.tensor(enc_lengths) if enc_lengths else torch.randint(1, t_enc + 1, (b,), generator=g)
    dec = torch.tensor(dec_lengths) if dec_lengths else torch.randint(0, t_dec + 1, (b,), generator=g)
    labels = torch.randint(3, V, (len(dec), t_dec), generator=g)
    labels = labels.masked_fill(torch.arange(t_dec)[None] >= dec[:, None], -100)
    return with_indices({"attention_mask": (torch.arange(t_enc)[None] < enc[:, None]).long(), "labels": labels})


@dataclass
class FakeOutput(Output):
    logits: Optional[Tensor] = None  # (B, T, V): ``hidden`` holds its target rows


def identity_head(vocab: int, dtype: torch.dtype, device) -> Head:
    linear = nn.Linear(vocab, vocab, bias=False, dtype=dtype, device=device)
    linear.weight.data.copy_(torch.eye(vocab, dtype=dtype))
    linear.weight.requires_grad_(False)
    return Head(linear)


def logits_output(logits: Tensor, target_index: Tensor, features: Optional[Features] = None) -> FakeOutput:
    """An ``Output`` whose head gives back ``logits`` at the target rows (gradients reach ``logits``)."""
    rows = logits.reshape(-1, logits.shape[-1]).index_select(0, target_index)
    return FakeOutput(rows, identity_head(logits.shape[-1], logits.dtype, logits.device), features, None, logits)


def logit_sums(term, batch: dict, student: Output, teacher: Optional[Output], budget_mib: float = 1.0) -> dict:
    """A logit term's parts, each summed over the target rows by the fused pass (differentiable)."""
    labels = batch["labels"].reshape(-1).index_select(0, batch["target_index"])
    t = None if teacher is None else Side(teacher.hidden, teacher.head)
    return {part: head_pass(Side(student.hidden, student.head), t, [RowSum(fn, 1.0)], budget_mib)[0]
            for part, fn in term.row_values(labels).items()}


def fake_output(config, request, batch: dict, seed: int, dtype=torch.float64, grad: bool = False) -> Output:
    """Random logits and the features ``request`` names, shaped as ``config``'s model would give them,
    on the batch's device."""
    g = torch.Generator().manual_seed(seed)
    device = batch["labels"].device

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).to(device).requires_grad_(grad)

    b, t_enc = batch["attention_mask"].shape
    t_dec = batch["labels"].shape[1]
    length = {"encoder": t_enc, "decoder": t_dec}
    real = {"encoder": batch["attention_mask"].bool(), "decoder": batch["labels"] != -100}
    features = Features()
    for stack, indices in request.hidden.items():
        for i in indices:
            features.hidden[(stack, i)] = rand(b, length[stack], hidden_size(config))
    for site, layers in request.attention.items():
        stack = SITE_STACK[site]
        keys = "decoder" if site == "decoder_self" else "encoder"
        heads, kv_heads, head_dim = attention_dims(config, stack)
        keep = real[keys][:, None, None, :]
        if site == "decoder_self":
            keep = keep & torch.ones(t_dec, t_dec, dtype=torch.bool, device=device).tril()
        for layer in layers:
            features.attention[(site, layer)] = AttentionInputs(
                rand(b, heads, length[stack], head_dim), rand(b, kv_heads, length[keys], head_dim),
                rand(b, kv_heads, length[keys], head_dim), keep, head_dim**-0.5, None)
    return logits_output(rand(b, t_dec, config.vocab_size, scale=3.0), batch["target_index"], features)


def outputs(objective, batch: dict, seed: int, dtype=torch.float64, projections=None):
    """(student, teacher) outputs for ``objective``'s requests; the student's features pass through
    its projections as in the student's forward."""
    student = fake_output(STUDENT, objective.student_request, batch, seed, dtype, grad=True)
    teacher = fake_output(TEACHER, objective.teacher_request, batch, seed + 1000, dtype)
    if projections is not None:
        objective.project(student.features, projections)
    return student, teacher


def rows(batch: dict, out: Output, start: int, stop: int) -> tuple[dict, Output]:
    """Rows start:stop of a batch and of one model's output: a micro-batch."""
    features = Features(
        hidden={k: v[start:stop] for k, v in out.features.hidden.items()},
        attention={k: AttentionInputs(a.query[start:stop], a.key[start:stop], a.value[start:stop], a.keep[start:stop],
                                      a.scaling, None) for k, a in out.features.attention.items()},
        projected={k: v[start:stop] for k, v in out.features.projected.items()})
    micro = with_indices({k: batch[k][start:stop] for k in ("attention_mask", "labels")})
    return micro, logits_output(out.logits[start:stop], micro["target_index"], features)
