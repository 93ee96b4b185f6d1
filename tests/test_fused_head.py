"""The fused LM head: the trunk and ``Head`` of every family against the model's own logits, the chunked
pass (values and gradients for the hidden rows, the head weight and bias) against float64 unfused
references, the proof that no rows × vocabulary tensor exists, and evaluation CE through it."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import (BartConfig, BartForConditionalGeneration, BertConfig, BertForMaskedLM, Gemma2Config,
                          Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, ModernBertConfig,
                          ModernBertForMaskedLM, Qwen2Config, Qwen2ForCausalLM, RobertaConfig, RobertaForMaskedLM,
                          T5Config, T5ForConditionalGeneration, XLMRobertaConfig, XLMRobertaForMaskedLM)

from distill.losses.divergences import DIVERGENCES, scaled_divergence
from distill.losses import fused_head
from distill.losses.fused_head import LIVE_ROW_TENSORS, RowSum, Side, head_pass, row_bytes, rows_per_chunk
from distill.losses.metrics import AGREEMENT, teacher_forced_sums
from distill.losses.terms.mse import logit_mse
from distill.models.lm_head import Head, head_of, trunk

PARAMS = {"beta": 0.3, "alpha": 0.2, "lam": 0.6}
LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=1)

ENCODER = dict(vocab_size=90, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               pad_token_id=1, max_position_embeddings=40)

FAMILIES = {
    "bart": lambda: BartForConditionalGeneration(BartConfig(
        vocab_size=90, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=1, decoder_start_token_id=2)),
    "t5-tied": lambda: T5ForConditionalGeneration(T5Config(
        vocab_size=90, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, pad_token_id=1,
        decoder_start_token_id=2)),
    "t5-untied": lambda: T5ForConditionalGeneration(T5Config(
        vocab_size=90, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, pad_token_id=1,
        decoder_start_token_id=2, tie_word_embeddings=False)),
    "llama-untied": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=False)),
    "qwen2-tied": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA, tie_word_embeddings=True)),
    "gemma2-softcap": lambda: Gemma2ForCausalLM(Gemma2Config(**LLAMA, head_dim=8, final_logit_softcapping=3.0)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=90, n_embd=32, n_layer=2, n_head=4)),
    # masked LMs: a transform (dense, activation, LayerNorm) before the vocabulary matrix
    "bert": lambda: BertForMaskedLM(BertConfig(**ENCODER, hidden_act="gelu_new")),
    "roberta": lambda: RobertaForMaskedLM(RobertaConfig(**ENCODER)),
    "xlm-roberta": lambda: XLMRobertaForMaskedLM(XLMRobertaConfig(**ENCODER)),
    "modernbert": lambda: ModernBertForMaskedLM(ModernBertConfig(**ENCODER, global_attn_every_n_layers=2,
                                                                 local_attention=4)),
}


def _inputs(model):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 1, 1]])
    inputs = {"input_ids": ids, "attention_mask": (ids != 1).long()}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.tensor([[2, 11, 12, 13], [2, 11, 12, 1]])
    return inputs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trunk_and_head_give_the_models_own_logits(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    if hasattr(model, "final_logits_bias"):
        model.final_logits_bias.normal_()  # zeros at init would hide a missing bias
    head = head_of(model)
    encoder = family in ("bert", "roberta", "xlm-roberta", "modernbert")
    if encoder:
        with torch.no_grad():
            head.bias.normal_()
            for name, p in model.named_parameters():  # LayerNorm's 1 and 0 would hide a missing transform
                if "norm" in name.lower():
                    p.normal_()
    expected = {"bart": (1.0, None, True), "t5-tied": (32**-0.5, None, False), "t5-untied": (1.0, None, False),
                "gemma2-softcap": (1.0, 3.0, False)}.get(family, (1.0, None, encoder))
    assert (head.scale, head.softcap, head.bias is not None, head.transform is not None) == (*expected, encoder)
    inputs = _inputs(model)
    if family == "modernbert":  # longer than its 4-token sliding window
        inputs = {k: torch.cat([v, v, v], 1) for k, v in inputs.items()}
    with torch.no_grad():
        reference = model(**inputs).logits
        hidden, _ = trunk(model, **inputs)
        logits = head.logits(head.prepare(hidden))
    assert_close(logits, reference, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the pass against float64 references


def _head(vocab, width, seed, dtype, bias=False, trainable_bias=False, scale=1.0, softcap=None, frozen=False):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(width, vocab, bias=False, dtype=dtype)
    linear.weight.data = torch.randn(vocab, width, generator=g, dtype=torch.float64).to(dtype) / math.sqrt(width) * 3
    linear.weight.requires_grad_(not frozen)
    b = None
    if bias:
        b = nn.Parameter(torch.randn(1, vocab, generator=g, dtype=torch.float64).to(dtype), trainable_bias)
    return Head(linear, b, scale, softcap)


def _reference_logits(head, hidden, weight, bias):
    z = F.linear(hidden * head.scale, weight, None if bias is None else bias.reshape(-1))
    return z if head.softcap is None else head.softcap * torch.tanh(z / head.softcap)


def _sums(kind, labels, tau=2.0):
    return [(RowSum(lambda s, t, r: F.cross_entropy(s, labels[r], reduction="none", label_smoothing=0.1), 0.3)),
            RowSum(lambda s, t, r: scaled_divergence(s, t, kind, tau, **PARAMS), 1.0),
            RowSum(lambda s, t, r: logit_mse(s, t), 0.01),
            RowSum(AGREEMENT["top1"])]  # a metric: reported, never differentiated


def _case(dtype, n=13, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    student = _head(20, 8, seed, dtype, bias=True, trainable_bias=True, scale=0.5, softcap=5.0)
    teacher = _head(23, 12, seed + 1, dtype, bias=True)  # 3 padding rows past the student's vocabulary
    h_s = torch.randn(n, 8, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    h_t = torch.randn(n, 12, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, 20, (n,), generator=g)
    return student, teacher, h_s, h_t, labels


def _reference(kind, student, teacher, h_s, h_t, labels):
    """Full logits in float64, autograd: (weighted total, values, grads of hidden, weight, bias)."""
    w = student.weight.detach().double().requires_grad_()
    b = student.bias.detach().double().requires_grad_()
    h = h_s.detach().double().requires_grad_()
    s = _reference_logits(student, h, w, b)
    t = _reference_logits(teacher, h_t.double(), teacher.weight.detach().double(), teacher.bias.detach().double())
    items = _sums(kind, labels)
    values = torch.stack([item.fn(s, t, slice(None)).sum() for item in items])
    total = sum(item.coef * values[k] for k, item in enumerate(items) if item.coef is not None)
    total.backward()
    return total.detach(), values.detach(), h.grad, w.grad, b.grad


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("rows", [1, 4, 100])
@pytest.mark.parametrize("sub_chunks", ["cpu", "3 rows", "none (GPU)"])
@pytest.mark.parametrize("vocab_block", [None, 7])
def test_pass_matches_the_unfused_float64_reference(kind, rows, sub_chunks, vocab_block, monkeypatch):
    # the row functions over cache-sized sub-chunks (CPU: larger than these chunks), sub-chunks of 3 rows
    # inside each chunk, and none (a GPU's whole chunk); the logits in one matmul, or 7 weight rows at a
    # time (CPU's VOCAB_BLOCK, here with a partial last block of both heads)
    sub = {"cpu": fused_head.SUB_CHUNK_ELEMENTS, "3 rows": {"cpu": 3 * 20}, "none (GPU)": {}}[sub_chunks]
    monkeypatch.setattr(fused_head, "SUB_CHUNK_ELEMENTS", sub)
    monkeypatch.setattr(fused_head, "VOCAB_BLOCK", {} if vocab_block is None else {"cpu": vocab_block})
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        student, teacher, h_s, h_t, labels = _case(dtype)
        budget = rows * row_bytes([20, 23], torch.device("cpu")) / 2**20
        total, values = head_pass(Side(h_s, student), Side(h_t, teacher), _sums(kind, labels), budget)
        total.backward()
        ref_total, ref_values, ref_h, ref_w, ref_b = _reference(kind, student, teacher, h_s, h_t, labels)
        assert total.dtype == dtype and values.dtype == torch.float64
        assert_close(total.double(), ref_total, rtol=tol, atol=tol)
        assert_close(values, ref_values, rtol=tol, atol=tol)
        for got, ref in ((h_s.grad, ref_h), (student.weight.grad, ref_w), (student.bias.grad, ref_b)):
            assert got.dtype == dtype
            assert_close(got.double(), ref, rtol=tol, atol=tol)
        assert teacher.weight.grad is None and teacher.bias.grad is None


def test_a_frozen_head_and_no_grad_mode_compute_no_weight_gradient():
    student, teacher, h_s, h_t, labels = _case(torch.float32)
    student.weight.requires_grad_(False)
    total, _ = head_pass(Side(h_s, student), Side(h_t, teacher), _sums("forward_kl", labels), 1.0)
    total.backward()
    assert student.weight.grad is None and h_s.grad.abs().sum() > 0
    with torch.no_grad():
        total, values = head_pass(Side(h_s, student), Side(h_t, teacher), _sums("forward_kl", labels), 1.0)
    assert not total.requires_grad and torch.isfinite(values).all()


def test_the_gradient_is_scaled_by_the_upstream_gradient_and_zero_rows_give_zero():
    student, teacher, h_s, h_t, labels = _case(torch.float64)
    total, _ = head_pass(Side(h_s, student), Side(h_t, teacher), _sums("jsd", labels), 1.0)
    (3.0 * total).backward()
    _, _, ref_h, ref_w, _ = _reference("jsd", student, teacher, h_s, h_t, labels)
    assert_close(h_s.grad, 3.0 * ref_h) and assert_close(student.weight.grad, 3.0 * ref_w)
    empty = h_s.detach()[:0].requires_grad_()
    total, values = head_pass(Side(empty, student), Side(h_t[:0], teacher), _sums("jsd", labels[:0]), 1.0)
    total.backward()
    assert total.item() == 0.0 and (values == 0).all() and empty.grad.shape == (0, 8)


def test_bf16_heads_accumulate_the_weight_gradient_in_their_dtype():
    student, teacher, h_s, h_t, labels = _case(torch.bfloat16, n=40)
    total, _ = head_pass(Side(h_s, student), Side(h_t, teacher), _sums("forward_kl", labels), 1e-3)
    total.backward()
    _, _, _, ref_w, _ = _reference("forward_kl", student, teacher, h_s, h_t, labels)
    assert total.dtype == torch.float32 and student.weight.grad.dtype == torch.bfloat16
    assert_close(student.weight.grad.double(), ref_w, rtol=0.05, atol=0.05)


class _Largest(TorchDispatchMode):
    """The most elements of any tensor an op produced while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numel = max([self.numel] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


def test_no_tensor_of_all_rows_by_vocabulary_exists_forward_or_backward():
    n, vocab, width, rows = 256, 2000, 16, 8
    g = torch.Generator().manual_seed(0)
    student = _head(vocab, width, 0, torch.float32, bias=True, trainable_bias=True)
    teacher = _head(vocab, width, 1, torch.float32)
    h_s = torch.randn(n, width, generator=g).requires_grad_()
    h_t = torch.randn(n, width, generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    budget = rows * row_bytes([vocab, vocab], torch.device("cpu")) / 2**20
    assert rows_per_chunk(budget, [vocab, vocab], torch.device("cpu")) == rows
    with _Largest() as largest:
        total, _ = head_pass(Side(h_s, student), Side(h_t, teacher), _sums("forward_kl", labels), budget)
        total.backward()
    assert largest.numel <= max(rows * vocab, vocab * width) < n * vocab
    assert h_s.grad.abs().sum() > 0 and student.weight.grad.abs().sum() > 0


def test_rows_per_chunk_follow_the_byte_budget():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert rows_per_chunk(1024, [128256, 128256], gpu) == 1024 * 2**20 // (LIVE_ROW_TENSORS * 4 * 2 * 128256)
    assert rows_per_chunk(1024, [128256, 128256], gpu) > 100  # hundreds of rows at a 128k vocabulary on a GPU
    # on CPU the row functions run over cache-sized sub-chunks: a chunk holds both logits (the gradient
    # overwrites the student's)
    assert rows_per_chunk(1024, [128256, 128256], cpu) == 1024 * 2**20 // (4 * 2 * 128256)
    assert rows_per_chunk(1e-9, [10], cpu) == 1


# ---------------------------------------------------------------- evaluation through the pass


def test_teacher_forced_sums_and_perplexity_match_full_logits():
    from distill.infer.evaluate import perplexity

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    inputs = _inputs(model)
    with torch.no_grad():
        logits = model(**inputs).logits
        hidden, _ = trunk(model, **inputs)
    labels = torch.tensor([[6, 7, 8, 9, 10, -100], [6, 7, -100, -100, -100, -100]])
    weight = torch.tensor([1.0, 0.5])
    real = labels != -100
    rows = real.reshape(-1).nonzero().squeeze(1)
    from distill.models.capture import Output

    got = teacher_forced_sums(Output(hidden.reshape(-1, 32)[rows], head_of(model)), labels.reshape(-1)[rows],
                              weight[:, None].expand(2, 6).reshape(-1)[rows], 1e-3)
    nll = F.cross_entropy(logits[real], labels[real], reduction="none")
    w = weight[:, None].expand(2, 6)[real]
    correct = (logits[real].argmax(-1) == labels[real]).float()
    assert_close(got, torch.stack([(nll * w).sum(), w.sum(), (correct * w).sum()]).double(), rtol=1e-5, atol=1e-6)

    class Tok:  # the two rows above, as a tokenizer would give them
        def __call__(self, texts, **kwargs):
            return _Batch({k: v[:len(texts)] for k, v in inputs.items()})

    full = F.cross_entropy(logits[:, :-1][inputs["attention_mask"][:, 1:].bool()],
                           inputs["input_ids"][:, 1:][inputs["attention_mask"][:, 1:].bool()])
    assert perplexity(model, Tok(), ["a", "b"], 2, 16, "cpu") == pytest.approx(math.exp(full.item()), rel=1e-5)


class _Batch(dict):
    def to(self, device):
        return self


# ---------------------------------------------------------------- ZeRO-3 on 2 ranks


def _pairs(root):
    """Four teacher/student pairs: BART (tied, final_logits_bias), T5 (tied: scaled), LLaMA (untied, the
    teacher's vocabulary padded by 8 rows), Qwen2 (tied)."""
    def bart(d, layers):
        return BartForConditionalGeneration(BartConfig(
            vocab_size=90, d_model=d, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=2 * d, decoder_ffn_dim=2 * d, pad_token_id=1,
            decoder_start_token_id=2, dropout=0.0, attention_dropout=0.0))

    def t5(d, layers):
        return T5ForConditionalGeneration(T5Config(
            vocab_size=90, d_model=d, d_kv=d // 4, d_ff=2 * d, num_layers=layers, num_decoder_layers=layers,
            num_heads=4, pad_token_id=1, decoder_start_token_id=2, dropout_rate=0.0))

    def causal(cls, config_cls, d, layers, vocab, tied):
        return cls(config_cls(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, pad_token_id=1, tie_word_embeddings=tied))

    pairs = {"bart": (bart(48, 2), bart(32, 1)), "t5": (t5(48, 2), t5(32, 1)),
             "llama": (causal(LlamaForCausalLM, LlamaConfig, 48, 2, 104, False),
                       causal(LlamaForCausalLM, LlamaConfig, 32, 1, 96, False)),
             "qwen2": (causal(Qwen2ForCausalLM, Qwen2Config, 48, 2, 96, True),
                       causal(Qwen2ForCausalLM, Qwen2Config, 32, 1, 96, True))}
    torch.manual_seed(0)
    for name, (teacher, student) in pairs.items():
        for role, model in (("teacher", teacher), ("student", student)):
            if hasattr(model, "final_logits_bias"):
                model.final_logits_bias.normal_()
            model.save_pretrained(root / name / role)


@pytest.mark.integration
def test_zero3_fused_gradients_equal_the_unfused_path_on_two_ranks(tmp_path):
    import json

    import ranks

    _pairs(tmp_path)
    proc = ranks.launch(ranks.ROOT / "tests/scripts/fused_head_zero3.py", [tmp_path, "zero3,frozen,offload"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {(r["pair"], r["setting"]) for r in rows} == {(p, s) for p in ("bart", "t5", "llama", "qwen2")
                                                         for s in ("zero3", "frozen", "offload")}
    for r in rows:
        assert r["loss_rel"] < 1e-5 and r["grad_rel"] < 1e-5 and r["grad_rel_max"] < 1e-5, r
        # a frozen embedding freezes a tied head; LLaMA's untied head still trains
        assert r["head_trained"] == (r["setting"] != "frozen" or r["pair"] == "llama"), r
