"""Attention and relation maps into their KL (padding, gradients, empty rows), the maps rebuilt from
captured queries and keys against transformers' eager attention (BART, LLaMA with grouped-query
attention), and the row-chunked map KL the attention and relation terms use against the whole maps."""

import pytest
import torch
from torch.testing import assert_close

from distill.losses.features import attention_log_probs, distribution_kl, map_kl, relation_log_probs, row_slice


def _pad_mask(lengths, t):
    """(B, t) True on the first lengths[b] positions: right padding."""
    return torch.tensor([[i < n for i in range(t)] for n in lengths])


def idx(mask):
    """Flat indices of a mask's True entries (None stays None: every row), as the collator's indices."""
    return None if mask is None else mask.reshape(-1).nonzero().squeeze(1)


# ---------------------------------------------------------------- end to end: maps -> KL


def test_attention_kl_pipeline_padding_gradients_and_empty_rows():
    """Student/teacher q,k -> attention_log_probs -> distribution_kl, with a fully padded sequence."""
    torch.manual_seed(13)
    b, t, d = 3, 5, 4
    pad = _pad_mask([5, 3, 0], t)
    keep = pad[:, None, None, :] & torch.ones(t, t, dtype=torch.bool).tril()
    sq, sk = torch.randn(b, 4, t, d, requires_grad=True), torch.randn(b, 2, t, d, requires_grad=True)
    tq, tk = torch.randn(b, 4, t, d, requires_grad=True), torch.randn(b, 4, t, d, requires_grad=True)

    def loss_of(sq, sk, tq, tk, rows=pad):
        return distribution_kl(attention_log_probs(sq, sk, keep), attention_log_probs(tq, tk, keep), idx(rows))

    loss = loss_of(sq, sk, tq, tk)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert tq.grad is None and tk.grad is None  # the teacher is detached
    assert torch.isfinite(sq.grad).all() and torch.isfinite(sk.grad).all()
    assert (sq.grad[~pad[:, None, :, None].expand_as(sq)] == 0).all()
    assert (sk.grad[~pad[:, None, :, None].expand_as(sk)] == 0).all()

    # changing anything at padded positions (queries and keys) leaves the loss unchanged
    with torch.no_grad():
        changed = [x.detach().clone() for x in (sq, sk, tq, tk)]
        for x in changed:
            x[~pad[:, None, :, None].expand_as(x)] = 1e3
        assert_close(loss_of(*changed), loss.detach(), atol=0, rtol=0)

    # rows=None over the fully padded sequence: still no NaN anywhere
    z = sq.detach().clone().requires_grad_()
    full = loss_of(z, sk.detach(), tq, tk, rows=None)
    full.backward()
    assert torch.isfinite(full) and torch.isfinite(z.grad).all()

    # relation maps through the same path
    x_s = torch.randn(b, t, 12, requires_grad=True)
    x_t = torch.randn(b, t, 24, requires_grad=True)
    rel = distribution_kl(relation_log_probs(x_s, 4, keep), relation_log_probs(x_t, 4, keep), idx(pad))
    rel.backward()
    assert torch.isfinite(rel) and rel > 0 and x_t.grad is None and torch.isfinite(x_s.grad).all()
    x_s2 = x_s.detach().clone()
    x_s2[~pad] = -7.0
    moved = distribution_kl(relation_log_probs(x_s2, 4, keep), relation_log_probs(x_t, 4, keep), idx(pad))
    assert_close(moved, rel.detach())


# ---------------------------------------------------------------- real attention maps (transformers, eager)


def _capture(module, store, name):
    def hook(m, args, out):
        store[name] = out.detach()  # returns None: output unchanged

    return module.register_forward_hook(hook)


def _heads(x, d):
    b, t, _ = x.shape
    return x.view(b, t, -1, d).transpose(1, 2)


def _assert_real_rows(ours, theirs, real):
    assert ours.shape == theirs.shape
    sel = real[:, None, :, None].expand_as(theirs)
    assert_close(ours.exp()[sel], theirs.float()[sel], atol=1e-5, rtol=0)


def test_attention_log_probs_reproduces_bart_attention():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(14)
    cfg = transformers.BartConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
    )
    model = transformers.BartForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    d = 32 // 4
    enc_mask = _pad_mask([6, 4], 6)
    dec_mask = _pad_mask([5, 3], 5)
    input_ids = torch.randint(3, 64, (2, 6)).masked_fill(~enc_mask, cfg.pad_token_id)
    dec_ids = torch.randint(3, 64, (2, 5)).masked_fill(~dec_mask, cfg.pad_token_id)
    store = {}
    enc_attn = model.model.encoder.layers[0].self_attn
    dec_attn = model.model.decoder.layers[0].self_attn
    cross = model.model.decoder.layers[0].encoder_attn
    hooks = [
        _capture(m.q_proj, store, f"{n}.q") for n, m in (("enc", enc_attn), ("dec", dec_attn), ("cross", cross))
    ] + [_capture(m.k_proj, store, f"{n}.k") for n, m in (("enc", enc_attn), ("dec", dec_attn), ("cross", cross))]
    with torch.no_grad():
        out = model(
            input_ids=input_ids, attention_mask=enc_mask, decoder_input_ids=dec_ids,
            decoder_attention_mask=dec_mask, output_attentions=True, use_cache=False,
        )
    for h in hooks:
        h.remove()
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    cases = [
        ("enc", enc_mask[:, None, None, :], out.encoder_attentions[0], enc_mask),
        ("dec", dec_mask[:, None, None, :] & causal, out.decoder_attentions[0], dec_mask),
        ("cross", enc_mask[:, None, None, :], out.cross_attentions[0], dec_mask),
    ]
    for name, keep, theirs, real in cases:
        ours = attention_log_probs(_heads(store[f"{name}.q"], d), _heads(store[f"{name}.k"], d), keep, scaling=d**-0.5)
        _assert_real_rows(ours, theirs, real)


def test_attention_log_probs_reproduces_llama_gqa_attention():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(15)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    d = 32 // 4
    mask = _pad_mask([6, 4], 6)
    input_ids = torch.randint(1, 64, (2, 6))
    attn = model.model.layers[0].self_attn
    store = {}

    def grab_rope(module, args, kwargs):
        store["rope"] = kwargs["position_embeddings"]  # returns None: inputs unchanged

    hooks = [
        _capture(attn.q_proj, store, "q"),
        _capture(attn.k_proj, store, "k"),
        attn.register_forward_pre_hook(grab_rope, with_kwargs=True),
    ]
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, output_attentions=True, use_cache=False)
    for h in hooks:
        h.remove()
    cos, sin = store["rope"]
    q, k = apply_rotary_pos_emb(_heads(store["q"], d), _heads(store["k"], d), cos, sin)
    assert k.shape[1] == 2  # grouped-query: 2 kv heads for 4 query heads
    keep = mask[:, None, None, :] & torch.ones(6, 6, dtype=torch.bool).tril()
    ours = attention_log_probs(q, k, keep, scaling=d**-0.5)
    _assert_real_rows(ours, out.attentions[0], mask)


@pytest.mark.parametrize("chunk_elements", [1, 40, 10_000])  # one row, a few rows, all rows at once
def test_map_kl_in_row_chunks_equals_the_whole_maps(chunk_elements):
    """Attention maps (GQA, a learned bias that takes gradient, causal+padding mask) and MiniLMv2
    relations: value and every input's gradient equal the unchunked distribution_kl, float64."""
    torch.manual_seed(0)
    b, h, h_kv, t, d = 2, 4, 2, 5, 3
    q = torch.randn(b, h, t, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, h_kv, t, d, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, h, t, t, dtype=torch.float64, requires_grad=True)
    qt, kt = torch.randn(b, h, t, d, dtype=torch.float64), torch.randn(b, h_kv, t, d, dtype=torch.float64)
    pad = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    keep = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]

    whole = distribution_kl(attention_log_probs(q, k, keep, 0.7, bias), attention_log_probs(qt, kt, keep, 0.7),
                            idx(pad))
    expected = torch.autograd.grad(whole, (q, k, bias))
    chunked = map_kl(lambda ins, sl: attention_log_probs(ins[0][:, :, sl], ins[1], row_slice(keep, sl), 0.7,
                                                         row_slice(ins[2], sl)),
                     lambda sl: attention_log_probs(qt[:, :, sl], kt, row_slice(keep, sl), 0.7),
                     (q, k, bias), idx(pad), t, chunk_elements=chunk_elements)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(chunked, (q, k, bias)), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    x = torch.randn(b, t, 12, dtype=torch.float64, requires_grad=True)
    xt = torch.randn(b, t, 8, dtype=torch.float64)
    whole = distribution_kl(relation_log_probs(x, 4, keep), relation_log_probs(xt, 4, keep), idx(pad))
    (want,) = torch.autograd.grad(whole, x)
    chunked = map_kl(lambda ins, sl: relation_log_probs(ins[0], 4, keep, rows=sl),
                     lambda sl: relation_log_probs(xt, 4, keep, rows=sl), (x,), idx(pad), t,
                     chunk_elements=chunk_elements)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(chunked, x)[0], want, rtol=1e-10, atol=1e-12)
