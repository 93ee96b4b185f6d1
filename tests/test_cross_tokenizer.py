"""Cross-tokenizer distillation: token texts, aligned spans, ULD and the hybrid loss against float64
references, the whole span objective's gradient against dense autograd, and the collator."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from transformers import BartConfig

from distill.models.from_scratch import train_tokenizer

from distill.config.settings import LossConfig
from distill.data.token_alignment import (TEACHER_PREFIX, SharedVocab, align, edit_distances, mined_map,
                                          token_bytes)
from distill.losses.cross_tokenizer import mapped_divergence, shared_divergence, tempered_log_prob, uld
from distill.losses.objective import Objective, Output
from distill.models.lm_head import Head


# ---------------------------------------------------------------- alignment on hand-made vocabularies

def _vocab(student: list, teacher: list) -> SharedVocab:
    """A ``SharedVocab`` from token texts (str, or None for a special token), without tokenizers."""
    enc = lambda v: [None if t is None else t.encode() if isinstance(t, str) else t for t in v]  # noqa: E731
    vocab = SharedVocab(enc(student), enc(teacher))
    first = {}
    for i, t in enumerate(vocab.teacher):
        if t is not None:
            first.setdefault(t, i)
    vocab.to_teacher = {i: first[t] for i, t in enumerate(vocab.student) if t is not None and t in first}
    vocab.to_teacher[0] = 0  # the special at id 0 on both sides: EOS
    return vocab


S = [None, " the", " cat", " sat", "s", "at", " c", "é", "\n", " ", b"\xc3", b"\xa9", "!", " down", " do", "w", "n"]
T = [None, " the", " ca", "t", " s", "a", "t", " cat", " sa", b"\xc3", b"\xa9", "\n", "!", " do", "w", "n", " down"]


def _texts(vocab, side, ids):
    table = vocab.student if side == "s" else vocab.teacher
    return b"".join(table[i] or b"" for i in ids).replace(b" ", b"")


@pytest.mark.parametrize("s_ids,t_ids,spans_s,spans_t,exact", [
    # the same words, one shared token each, then EOS on both sides
    ([1, 2, 0], [1, 7, 0], [[0], [1], [2]], [[0], [1], [2]], [True, True, True]),
    # a word split 1:2 (" cat" vs " ca"+"t") and 2:1 (" c"+"at" vs " cat")
    ([1, 2], [1, 2, 3], [[0], [1]], [[0], [1, 2]], [True, False]),
    ([1, 6, 5], [1, 7], [[0], [1, 2]], [[0], [1]], [True, False]),
    # 1:3 (" down" vs " do"+"w"+"n") and 3:1 back
    ([13, 12], [13, 14, 15, 12], [[0], [1]], [[0, 1, 2], [3]], [False, True]),
    ([14, 15, 16], [16], [[0, 1, 2]], [[0]], [False]),
    # byte fallback: "é" as one token against its two UTF-8 bytes, and bytes against bytes
    ([7, 12], [9, 10, 12], [[0], [1]], [[0, 1], [2]], [False, True]),
    ([10, 11], [9, 10], [[0], [1]], [[0], [1]], [True, True]),
    # whitespace tokens (a newline, a lone space) join the span before them
    ([1, 8, 9, 2], [1, 11, 7], [[0, 1, 2], [3]], [[0, 1], [2]], [False, True]),
    # a leading special (BART's <s> in the labels) on one side only is left out; EOS pairs at the end
    ([0, 1, 3, 0], [1, 4, 5, 6, 0], [[1], [2], [3]], [[0], [1, 2, 3], [4]], [True, False, True]),
])
def test_spans_on_hand_made_vocabularies(s_ids, t_ids, spans_s, spans_t, exact):
    vocab = _vocab(S, T)
    found = align(s_ids, t_ids, vocab)
    assert (found.student, found.teacher, found.exact) == (spans_s, spans_t, exact)
    for ss, tt in zip(found.student, found.teacher):  # each span covers the same text on both sides
        assert _texts(vocab, "s", [s_ids[k] for k in ss]) == _texts(vocab, "t", [t_ids[k] for k in tt])


def test_text_after_a_disagreement_or_a_truncation_is_left_out():
    vocab = _vocab(S, T)
    # the teacher was truncated after " the ca": only " the" aligns, and the EOS is not paired
    found = align([1, 2, 3, 0], [1, 2], vocab)
    assert found.student == [[0]] and found.teacher == [[0]]
    # different text after " the" (an unknown token, another normalization): nothing past it
    found = align([1, 2, 3], [1, 8, 5, 6], vocab)
    assert found.student == [[0]] and found.teacher == [[0]]
    assert align([], [1], vocab).student == []


# ---------------------------------------------------------------- the MinED map

def _ref_levenshtein(a: bytes, b: bytes) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row = row, [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (x != y))
    return row[-1]


@pytest.mark.parametrize("m,n", [(1, 1), (3, 5), (6, 2), (4, 4), (2, 0)])
def test_edit_distances_match_the_textbook_table(m, n):
    g = torch.Generator().manual_seed(m * 10 + n)
    a = torch.randint(97, 100, (7, m), generator=g, dtype=torch.uint8).numpy()  # 3 letters: many near matches
    b = torch.randint(97, 100, (9, n), generator=g, dtype=torch.uint8).numpy()
    ref = [[_ref_levenshtein(bytes(x), bytes(y)) for y in b] for x in a]
    assert edit_distances(a, b).tolist() == ref


def test_the_mined_map_on_hand_made_vocabularies():
    student = [None, b" cat", b" ca", b" c", b"at", b" 199", b"8", b" dog", None, b" cat"]
    teacher = [None, b" cat", b" 1998", b" cats", b" dot", b"t", None, b" caz"]
    out = mined_map(student, teacher, {0: 0}).tolist()
    assert out[0] == 0  # EOS by role
    assert out[1] == 1  # its own text, the lowest id of two
    assert out[2] == 5  # " 1998" -> " 199": distance 1
    assert out[3] == 1  # " cats" -> " cat"
    assert out[4] == 7  # " dot" -> " dog": distance 1 (" cat" is 2 away)
    assert out[5] == 4  # "t" -> "at" or "8", both 1 away and no common prefix: the lower id
    assert out[6] == -1  # a special with no counterpart
    assert out[7] == 1  # " caz": " cat" and " ca" are both 1 away, " cat" shares the longer prefix
    for t, text in enumerate(teacher):  # the minimum distance, against brute force
        if text is not None:
            assert _ref_levenshtein(text, student[out[t]]) == min(_ref_levenshtein(text, s) for s in student if s)


def test_the_mined_map_of_two_real_tokenizers_is_their_nearest_texts(tokenizers):
    bpe, unigram = tokenizers
    vocab = SharedVocab.of(bpe, unigram, len(bpe), len(unigram), mined=True)
    s_ids, t_ids = vocab.mined_pairs()
    texts = [t for t in vocab.student if t is not None]
    for s, t in zip(s_ids.tolist()[::5], t_ids.tolist()[::5]):
        if vocab.teacher[t] is not None:
            assert _ref_levenshtein(vocab.teacher[t], vocab.student[s]) == min(
                _ref_levenshtein(vocab.teacher[t], x) for x in texts)
    for s, t in vocab.to_teacher.items():  # shared tokens map to themselves
        assert vocab.to_student[t] == s


# ---------------------------------------------------------------- real tokenizers

CORPUS = [f"The {w} sat on the {v} mat, {n} times; naïve café déjà vu." for w in ("cat", "dog", "hen", "eel")
          for v in ("red", "big", "old") for n in range(6)]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The demo's two kinds: a byte-level BPE and a Unigram with byte fallback, on a small corpus."""
    root = tmp_path_factory.mktemp("tokenizers")
    return train_tokenizer(CORPUS, root / "bpe", 300), train_tokenizer(CORPUS, root / "unigram", 120, "unigram")


def test_token_texts_decode_like_the_tokenizers(tokenizers):
    for tok in tokenizers:
        table = token_bytes(tok)
        for text in CORPUS[:5] + ["new wörds ünseen 🐈 here"]:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            joined = b"".join(table[i] for i in ids).decode("utf-8", errors="replace")
            assert joined.strip() == tok.decode(ids).strip() == text
        assert table[tok.eos_token_id] is None


def test_the_shared_vocabulary_of_two_large_vocabularies(tmp_path):
    """Llama- and Qwen-sized vocabularies (128k and 152k entries, 100k texts in common, in other orders):
    a one-to-one map, built in one pass over each."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    def vocabulary(words, eos):
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                                                                  unk_token="<unk>")),
                                      unk_token="<unk>", eos_token=eos)
        return tok

    common = [f"w{i}" for i in range(100_000)]
    llama = vocabulary(["<unk>", "<|eot|>", *common, *(f"l{i}" for i in range(28_070))], "<|eot|>")
    qwen = vocabulary(["<unk>", "<|im_end|>", *common[::-1], *(f"q{i}" for i in range(52_062))], "<|im_end|>")
    vocab = SharedVocab.of(llama, qwen, len(llama), len(qwen))
    assert len(vocab.to_teacher) == 100_000 + 2  # the common words, EOS by role, UNK by role
    assert vocab.to_teacher[llama.convert_tokens_to_ids("w7")] == qwen.convert_tokens_to_ids("w7")
    assert vocab.to_teacher[llama.eos_token_id] == qwen.eos_token_id
    assert len(set(vocab.to_teacher.values())) == len(vocab.to_teacher)  # one-to-one
    assert vocab.student_ids.shape == vocab.teacher_ids.shape == (100_002,)


def test_spans_of_two_real_tokenizers_cover_the_same_text(tokenizers):
    bpe, unigram = tokenizers
    vocab = SharedVocab.of(bpe, unigram, len(bpe), len(unigram))
    assert vocab.to_teacher[bpe.eos_token_id] == unigram.eos_token_id and len(vocab.to_teacher) > 20
    for text in CORPUS[::7] + ["new wörds ünseen 🐈 here"]:
        s_ids = bpe(text, add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]
        t_ids = unigram(text, add_special_tokens=False)["input_ids"] + [unigram.eos_token_id]
        found = align(s_ids, t_ids, vocab)
        assert sum(map(len, found.student)) == len(s_ids) and sum(map(len, found.teacher)) == len(t_ids)
        assert found.exact[-1]  # EOS against EOS
        for ss, tt, ex in zip(found.student, found.teacher, found.exact):
            s_text = b"".join(vocab.student[s_ids[k]] or b"" for k in ss).strip()
            t_text = b"".join(vocab.teacher[t_ids[k]] or b"" for k in tt).strip()
            assert s_text.replace(b" ", b"") == t_text.replace(b" ", b"")
            assert ex == (len(ss) == len(tt) == 1 and vocab.to_teacher.get(s_ids[ss[0]]) == t_ids[tt[0]])


# ---------------------------------------------------------------- the losses against float64 references

def _ref_uld(s, t, c_s, c_t, tau, top_k):
    """Plain python: sorted probabilities, scaled, zero-padded (or cut to top_k plus the rest), L1."""
    out = []
    for zs, zt, a, b in zip(s.tolist(), t.tolist(), c_s.tolist(), c_t.tolist()):
        def probs(z, c):
            e = [math.exp(v / tau - max(z) / tau) for v in z]
            return sorted((x / sum(e) * math.exp(c) for x in e), reverse=True)
        p, q = probs(zs, a), probs(zt, b)
        if top_k is None:
            n = max(len(p), len(q))
            p, q = p + [0.0] * (n - len(p)), q + [0.0] * (n - len(q))
        else:
            L = min(len(p), len(q), top_k)
            p = p[:L] + [max(0.0, math.exp(a) - sum(p[:L]))]
            q = q[:L] + [max(0.0, math.exp(b) - sum(q[:L]))]
        out.append(tau**2 * sum(abs(x - y) for x, y in zip(p, q)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("top_k", [None, 3, 100])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_uld_matches_the_reference(top_k, tau):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 9, generator=g, dtype=torch.float64) * 2, torch.randn(6, 13, generator=g, dtype=torch.float64)
    c_s, c_t = -torch.rand(6, generator=g, dtype=torch.float64), -torch.rand(6, generator=g, dtype=torch.float64)
    assert_close(uld(s, t, c_s, c_t, tau, top_k), _ref_uld(s, t, c_s, c_t, tau, top_k), rtol=1e-12, atol=1e-12)
    # the gradient towards the student's logits and its log-scale (used by the continuation rows)
    inputs = (s.clone().requires_grad_(), c_s.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda z, c: uld(z, t, c, c_t, tau, top_k), inputs)


def _ref_shared(s, t, s_ids, t_ids, kind, tau):
    """Dense float64: both distributions renormalized over the shared tokens, then the divergence."""
    q, p = F.softmax(s[:, s_ids] / tau, -1), F.softmax(t[:, t_ids] / tau, -1)
    d = (p * (p.log() - q.log())).sum(-1) if kind == "forward_kl" else (q * (q.log() - p.log())).sum(-1)
    return tau**2 * d


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_shared_vocabulary_divergence_matches_the_reference(kind, tau):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 9, generator=g, dtype=torch.float64), torch.randn(5, 12, generator=g, dtype=torch.float64)
    s_ids, t_ids = torch.tensor([0, 2, 3, 7]), torch.tensor([5, 0, 11, 2])
    assert_close(shared_divergence(s, t, s_ids, t_ids, kind, tau), _ref_shared(s, t, s_ids, t_ids, kind, tau),
                 rtol=1e-10, atol=1e-12)
    # every token shared: the dense divergence
    full = torch.arange(9)
    dense = F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t[:, :9] / tau, -1), log_target=True,
                     reduction="none").sum(-1) * tau**2
    if kind == "forward_kl":
        assert_close(shared_divergence(s, t[:, :9], full, full, kind, tau), dense, rtol=1e-10, atol=1e-12)


def _ref_mapped(s, t, s_ids, t_ids, kind, tau):
    """Dense float64: the teacher's probabilities over the mapped tokens, summed into their student tokens."""
    p = F.softmax(t[:, t_ids] / tau, -1)
    q = torch.zeros(s.shape[0], s.shape[1], dtype=s.dtype)
    for k, (a, b) in enumerate(zip(s_ids.tolist(), t_ids.tolist())):
        q[:, a] += p[:, k]
    log_s = F.log_softmax(s / tau, -1)
    kl = lambda a, log_a, log_b: torch.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)  # noqa: E731
    if kind == "forward_kl":
        return tau**2 * kl(q, q.log(), log_s)
    m = 0.5 * q + 0.5 * log_s.exp()
    return tau**2 * (0.5 * kl(q, q.log(), m.log()) + 0.5 * kl(log_s.exp(), log_s, m.log()))


MINED = (torch.tensor([0, 2, 2, 5, 1, 9, 3]), torch.tensor([0, 1, 4, 5, 7, 11, 12]))  # many teacher -> one student


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_the_mapped_divergence_matches_the_reference(kind, tau):
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 10, generator=g, dtype=torch.float64), torch.randn(5, 13, generator=g, dtype=torch.float64)
    assert_close(mapped_divergence(s, t, *MINED, kind, tau), _ref_mapped(s, t, *MINED, kind, tau),
                 rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: mapped_divergence(z, t, *MINED, kind, tau), (s.clone().requires_grad_(),))
    # the same vocabulary, every token mapped to itself: the plain divergence
    full = torch.arange(10)
    dense = F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t[:, :10] / tau, -1), log_target=True,
                     reduction="none").sum(-1) * tau**2
    if kind == "forward_kl":
        assert_close(mapped_divergence(s, t[:, :10], full, full, kind, tau), dense, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- the whole span objective

def _head(vocab, width, seed):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(width, vocab, bias=False, dtype=torch.float64)
    linear.weight.data = torch.randn(vocab, width, generator=g, dtype=torch.float64)
    return Head(linear)


# student rows 0..8 and teacher rows 0..7 of two examples; spans as the collator gives them
SPANS_S = [[0], [1, 2], [3], [4, 5, 6], [7], [8]]
SPANS_T = [[0], [1], [2, 3], [4], [5], [6, 7]]
EXACT = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def _span_batch(labels_s, labels_t):
    def keys(spans, prefix):
        return {prefix + "span_first": torch.tensor([s[0] for s in spans]),
                prefix + "span_rest": torch.tensor([k for s in spans for k in s[1:]], dtype=torch.long),
                prefix + "span_rest_of": torch.tensor([j for j, s in enumerate(spans) for _ in s[1:]], dtype=torch.long)}
    return {"labels": labels_s[None], "target_index": torch.arange(len(labels_s)),
            TEACHER_PREFIX + "labels": labels_t[None], TEACHER_PREFIX + "target_index": torch.arange(len(labels_t)),
            "span_exact": torch.tensor(EXACT), **keys(SPANS_S, ""), **keys(SPANS_T, TEACHER_PREFIX)}


def _dense_reference(mode, h_s, w_s, h_t, w_t, labels_s, labels_t, shared, tau, w_ce, w_kd, top_k, uld_weight):
    s, t = h_s @ w_s.T, h_t @ w_t.T
    ce = F.cross_entropy(s, labels_s, reduction="sum") / len(labels_s)
    values = {"shared": 0.0, "uld": 0.0}
    for ss, tt, ex in zip(SPANS_S, SPANS_T, EXACT):
        c_s = sum(tempered_log_prob(s[k:k + 1], labels_s[k:k + 1], tau) for k in ss[1:]) if ss[1:] else s.new_zeros(1)
        c_t = sum(tempered_log_prob(t[k:k + 1], labels_t[k:k + 1], tau) for k in tt[1:]) if tt[1:] else t.new_zeros(1)
        if mode == "hybrid" and ex:
            values["shared"] = values["shared"] + _ref_shared(s[ss[0]:ss[0] + 1], t[tt[0]:tt[0] + 1], *shared,
                                                              "forward_kl", tau).sum()
        else:
            values["uld"] = values["uld"] + uld_weight * uld(s[ss[0]:ss[0] + 1], t[tt[0]:tt[0] + 1], c_s, c_t.detach(),
                                                             tau, top_k).sum()
    n = len(SPANS_S)
    return w_ce * ce + w_kd * (values["shared"] + values["uld"]) / n, {k: v / n for k, v in values.items()}


@pytest.mark.parametrize("mode,uld_weight", [("uld", 1.0), ("hybrid", 1.0), ("hybrid", 0.25), ("hybrid", 0.0)])
@pytest.mark.parametrize("top_k", [None, 4])
@pytest.mark.parametrize("budget", [1e-4, 1.0])  # one row per chunk, or all rows in one
def test_span_objective_and_its_gradient_match_dense_autograd(mode, uld_weight, top_k, budget, monkeypatch):
    import distill.losses.cross_tokenizer as cross

    if not uld_weight:  # hybrid without ULD spans (the recommended setting): no ULD pass may run
        for name in ("uld", "uld_log_scale_grad"):
            monkeypatch.setattr(cross, name, lambda *a, **k: pytest.fail("a ULD pass ran with loss.uld_weight=0"))
    g = torch.Generator().manual_seed(3)
    head_s, head_t = _head(11, 6, 0), _head(14, 5, 1)
    h_s = torch.randn(9, 6, generator=g, dtype=torch.float64).requires_grad_()
    h_t = torch.randn(8, 5, generator=g, dtype=torch.float64)
    labels_s, labels_t = torch.randint(0, 11, (9,), generator=g), torch.randint(0, 14, (8,), generator=g)
    shared = (torch.tensor([0, 1, 4, 5, 9]), torch.tensor([3, 1, 0, 12, 6]))
    cfg = LossConfig(w_ce=0.3, w_kd=0.7, cross_tokenizer=mode, uld_top_k=top_k, uld_weight=uld_weight, temperature=2.0,
                     logit_chunk_mib=budget)
    config = BartConfig(vocab_size=11, d_model=6, encoder_layers=1, decoder_layers=1)
    objective = Objective(cfg, 10, config, BartConfig(vocab_size=14, d_model=5, encoder_layers=1, decoder_layers=1))
    objective.shared_ids = shared
    batch = _span_batch(labels_s, labels_t)
    assert objective.count_names == ("target_gold", "span") and objective.counts(batch, True) == [9, 6]
    total, terms, agreement = objective(batch, Output(h_s, head_s), Output(h_t, head_t), True,
                                        torch.tensor([9.0, 6.0], dtype=torch.float64), agreement=True)
    assert agreement is None  # agreement metrics compare token for token
    grad_h, grad_w = torch.autograd.grad(total, [h_s, head_s.weight])

    w = head_s.weight.detach().clone().requires_grad_()
    h = h_s.detach().clone().requires_grad_()
    ref_total, ref_parts = _dense_reference(mode, h, w, h_t, head_t.weight.detach(), labels_s, labels_t, shared, 2.0,
                                            0.3, 0.7, top_k, uld_weight)
    ref_h, ref_w = torch.autograd.grad(ref_total, [h, w])
    assert_close(total, ref_total, rtol=1e-10, atol=1e-12)
    assert_close(grad_h, ref_h, rtol=1e-9, atol=1e-12)
    assert_close(grad_w, ref_w, rtol=1e-9, atol=1e-12)
    if mode == "hybrid" and not uld_weight:
        assert "kd/uld" not in terms
        assert_close(terms["kd"], ref_parts["shared"], rtol=1e-10, atol=1e-12)
    elif mode == "hybrid":
        assert_close(terms["kd/shared"], ref_parts["shared"], rtol=1e-10, atol=1e-12)
        assert_close(terms["kd/uld"], ref_parts["uld"], rtol=1e-10, atol=1e-12)
        assert_close(terms["kd"], terms["kd/shared"] + terms["kd/uld"])
    else:
        assert_close(terms["kd"], ref_parts["uld"], rtol=1e-10, atol=1e-12)


MAPPED = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]  # per span of SPANS_S / SPANS_T: first tokens agree under the map


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
@pytest.mark.parametrize("budget", [1e-4, 1.0])
def test_mined_objective_and_its_gradient_match_dense_autograd(kind, budget):
    g = torch.Generator().manual_seed(4)
    head_s, head_t = _head(11, 6, 0), _head(14, 5, 1)
    h_s = torch.randn(9, 6, generator=g, dtype=torch.float64).requires_grad_()
    h_t = torch.randn(8, 5, generator=g, dtype=torch.float64)
    labels_s, labels_t = torch.randint(0, 11, (9,), generator=g), torch.randint(0, 14, (8,), generator=g)
    cfg = LossConfig(w_ce=0.3, w_kd=0.7, cross_tokenizer="mined", divergence=kind, temperature=2.0,
                     logit_chunk_mib=budget)
    objective = Objective(cfg, 10, BartConfig(vocab_size=11, d_model=6, encoder_layers=1, decoder_layers=1),
                          BartConfig(vocab_size=14, d_model=5, encoder_layers=1, decoder_layers=1))
    objective.shared_ids = MINED
    batch = {**_span_batch(labels_s, labels_t), "span_mapped": torch.tensor(MAPPED)}
    assert objective.count_names == ("target", "target_gold")
    total, terms, _ = objective(batch, Output(h_s, head_s), Output(h_t, head_t), True,
                                torch.tensor([9.0, 9.0], dtype=torch.float64))
    grad_h, grad_w = torch.autograd.grad(total, [h_s, head_s.weight])

    w = head_s.weight.detach().clone().requires_grad_()
    h = h_s.detach().clone().requires_grad_()
    s, t = h @ w.T, h_t @ head_t.weight.detach().T
    mapped = {ss[0]: tt[0] for ss, tt, m in zip(SPANS_S, SPANS_T, MAPPED) if m}
    ce = F.cross_entropy(s, labels_s, reduction="none")
    kd_mapped = sum(_ref_mapped(s[i:i + 1], t[j:j + 1], *MINED, kind, 2.0).sum() for i, j in mapped.items()) / 9
    kd_gold = sum(ce[i] for i in range(9) if i not in mapped) / 9
    ref_total = 0.3 * ce.mean() + 0.7 * (kd_mapped + kd_gold)
    ref_h, ref_w = torch.autograd.grad(ref_total, [h, w])
    assert_close(total, ref_total, rtol=1e-10, atol=1e-12)
    assert_close(grad_h, ref_h, rtol=1e-9, atol=1e-12)
    assert_close(grad_w, ref_w, rtol=1e-9, atol=1e-12)
    assert_close(terms["kd/mapped"], kd_mapped.detach(), rtol=1e-10, atol=1e-12)
    assert_close(terms["kd/gold"], kd_gold.detach(), rtol=1e-10, atol=1e-12)
    assert_close(terms["kd"], terms["kd/mapped"] + terms["kd/gold"])


# ---------------------------------------------------------------- the collator

@pytest.fixture(scope="module")
def unigram_dir(demo_assets, tmp_path_factory):
    """The student's tokenizer: a Unigram with byte fallback on the demo corpus (the teacher's is its BPE)."""
    import datasets

    texts = [t for row in datasets.load_dataset(str(demo_assets["data"]), split="train") for t in row.values()
             if isinstance(t, str)]
    out = tmp_path_factory.mktemp("unigram")
    train_tokenizer(texts, out, 700, "unigram")
    return out


@pytest.fixture(scope="module")
def unigram(unigram_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(unigram_dir)


def _span_ids(batch, prefix):
    labels = batch[prefix + "labels"].reshape(-1).index_select(0, batch[prefix + "target_index"]).tolist()
    first, rest, rest_of = (batch[prefix + k].tolist() for k in ("span_first", "span_rest", "span_rest_of"))
    spans = [[labels[f]] for f in first]
    for r, j in zip(rest, rest_of):
        spans[j].append(labels[r])
    return spans, len(labels)


@pytest.mark.parametrize("causal", [False, True], ids=["seq2seq", "causal-packed"])
def test_collator_spans_index_the_same_text_in_both_batches(demo_assets, unigram, causal):
    from transformers import AutoTokenizer

    from distill.config.settings import DataConfig
    from distill.data.collate import CausalCollator, Seq2SeqCollator
    from distill.data.loading import load_split
    from distill.data.token_alignment import CrossTokenizerCollator

    bpe = AutoTokenizer.from_pretrained(demo_assets["tokenizer"])
    data = DataConfig(path=str(demo_assets["data"]), max_source_length=32, max_target_length=96, packing=causal)
    make = (lambda tok: CausalCollator(tok, data)) if causal else (lambda tok: Seq2SeqCollator(tok, data, tok.eos_token_id))
    vocab = SharedVocab.of(unigram, bpe, len(unigram), len(bpe))
    rows = [load_split(data, "train", "train")[i] for i in range(12)]
    batch = CrossTokenizerCollator(make(unigram), make(bpe), vocab)(rows)
    if causal:
        assert batch["input_ids"].shape[0] < len(rows)  # packed
    s_spans, n_s = _span_ids(batch, "")
    t_spans, n_t = _span_ids(batch, TEACHER_PREFIX)
    # every target aligns but the leading <s> a seq2seq label row starts with; EOS pairs with EOS
    leading = 0 if causal else len(rows)
    assert sum(map(len, s_spans)) == n_s - leading and sum(map(len, t_spans)) == n_t - leading
    exact = batch["span_exact"].tolist()
    for ss, tt, ex in zip(s_spans, t_spans, exact):
        assert _texts(vocab, "s", ss) == _texts(vocab, "t", tt)
        assert ex == (len(ss) == len(tt) == 1 and vocab.to_teacher.get(ss[0]) == tt[0])
    assert exact.count(1.0) > len(exact) / 3 and exact.count(0.0) > 0
    assert sum(ss == [unigram.eos_token_id] for ss in s_spans) == len(rows)
    # with the MinED map: a span is mapped where the teacher's first token maps to the student's, so every
    # shared 1:1 span is
    mined = SharedVocab.of(unigram, bpe, len(unigram), len(bpe), mined=True)
    mapped = CrossTokenizerCollator(make(unigram), make(bpe), mined)(rows)["span_mapped"].tolist()
    assert mapped == [float(int(mined.to_student[tt[0]]) == ss[0]) for ss, tt in zip(s_spans, t_spans)]
    assert all(m == 1.0 for m, e in zip(mapped, exact) if e) and mapped.count(1.0) > exact.count(1.0)


def test_feature_terms_need_the_same_tokens_on_both_sides(demo_assets, unigram):
    from transformers import AutoTokenizer

    from distill.config.settings import DataConfig
    from distill.data.collate import Seq2SeqCollator
    from distill.data.loading import load_split
    from distill.data.token_alignment import CrossTokenizerCollator
    from distill.errors import DistillError

    bpe = AutoTokenizer.from_pretrained(demo_assets["tokenizer"])
    data = DataConfig(path=str(demo_assets["data"]))
    rows = [load_split(data, "train", "train")[i] for i in range(4)]
    same = CrossTokenizerCollator(Seq2SeqCollator(bpe, data, 2), Seq2SeqCollator(bpe, data, 2),
                                  SharedVocab.of(bpe, bpe, len(bpe), len(bpe)), one_to_one=True)(rows)
    assert same["span_exact"].min() == 1.0
    other = CrossTokenizerCollator(Seq2SeqCollator(unigram, data, 2), Seq2SeqCollator(bpe, data, 2),
                                   SharedVocab.of(unigram, bpe, len(unigram), len(bpe)), one_to_one=True)
    with pytest.raises(DistillError, match="not one-to-one"):
        other(rows)


# ---------------------------------------------------------------- 2 ZeRO-3 ranks, the real launcher

COMMON = ["data.max_train_samples=48", "training.max_steps=4", "training.warmup_steps=0", "training.log_every=1",
          "training.micro_batch_size=4", "training.eval_every=0", "training.save_every=2", "eval.generate=false",
          "training.export=false"]


@pytest.fixture(scope="module")
def cross_tokenizer_runs(demo_assets, unigram_dir, tmp_path_factory):
    """The 2-rank runs of this module, in one launch: a BART teacher into a student of the Unigram tokenizer
    (hybrid), and a LLaMA teacher into a Qwen2 student of the Unigram tokenizer on packed rows (uld, mined)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from distill.models.from_scratch import init_model
    from ranks import ROOT, launch_jobs

    root = tmp_path_factory.mktemp("cross-tokenizer-runs")
    student = init_model(root / "student", unigram_dir, layers=1, d_model=64, ffn=128, heads=4)
    torch.manual_seed(0)
    for name, tok_dir, model in (
            ("llama", demo_assets["tokenizer"], lambda tok: LlamaForCausalLM(LlamaConfig(
                vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id))),
            ("qwen", unigram_dir, lambda tok: Qwen2ForCausalLM(Qwen2Config(
                vocab_size=len(tok) + 5, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)))):
        tok = AutoTokenizer.from_pretrained(tok_dir)
        model(tok).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    data = f"data.path={demo_assets['data']}"
    jobs = [(ROOT / "recipes/demo/kd.yaml", [f"teacher.path={demo_assets['teacher']}", f"student.path={student}", data,
                                             *COMMON, "loss.cross_tokenizer=hybrid", f"training.output_dir={root / 'bart'}"])]
    for mode in ("uld", "mined"):
        jobs.append((ROOT / "recipes/demo/kd.yaml", [
            f"teacher.path={root / 'llama'}", f"student.path={root / 'qwen'}", data, *COMMON, "training.save_every=4",
            f"loss.cross_tokenizer={mode}", "data.packing=true", "data.max_source_length=48",
            f"training.output_dir={root / mode}"]))
    run = launch_jobs(jobs, root / "jobs.json")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return root


@pytest.mark.integration
def test_two_ranks_distill_a_bart_teacher_into_a_student_of_another_tokenizer_and_resume(cross_tokenizer_runs,
                                                                                           tmp_path):
    from ranks import metrics, resumed_metrics

    logged = metrics(cross_tokenizer_runs / "bart")
    for step in (1, 2, 3, 4):
        row = logged[step]
        assert row["loss/kd/shared"] > 0 and row["loss/kd/uld"] > 0, row
        assert row["loss/kd"] == pytest.approx(row["loss/kd/shared"] + row["loss/kd/uld"], rel=1e-5)
        assert "agreement/top1" not in row
    # resumed from step 2: the spans come from the rows alone, so steps 3-4 are those of the run that never stopped
    after = resumed_metrics(cross_tokenizer_runs / "bart", tmp_path / "cut", "step-00000002")
    for step in (3, 4):
        for key in ("loss/total", "loss/kd/shared", "loss/kd/uld", "train/grad_norm"):
            assert after[step][key] == pytest.approx(logged[step][key], rel=1e-5, abs=1e-7), (step, key)


@pytest.mark.integration
@pytest.mark.parametrize("mode,part", [("uld", "loss/kd"), ("mined", "loss/kd/mapped")])
def test_two_ranks_distill_a_llama_teacher_into_a_qwen_student_of_another_tokenizer_on_packed_rows(
        cross_tokenizer_runs, mode, part):
    from ranks import metrics

    logged = metrics(cross_tokenizer_runs / mode)
    assert all(logged[step][part] > 0 for step in (1, 2, 3, 4))
    assert logged[4]["loss/total"] < logged[1]["loss/total"]


# ---------------------------------------------------------------- refusals

def test_what_needs_the_same_tokens_is_refused_across_tokenizers(pair):
    from ranks import ROOT

    from distill.config.parsing import load_config
    from distill.errors import DistillError

    def config(*overrides):
        return load_config(ROOT / "recipes/demo/kd.yaml", [*pair, "loss.cross_tokenizer=uld", *overrides])

    assert config().loss.cross_tokenizer == "uld" and config().loss.uld_top_k == 1024
    for overrides, message in ((["teacher.cache=/some/cache"], "teacher.cache holds logits at the student's"),
                               (["loss.w_mse=1"], "loss.w_mse compares logits token for token"),
                               (["loss.on_policy_fraction=0.5", "data.max_train_samples=null"], "retokenize every sample"),
                               (["loss.teacher_uses_student_encoder=true"], "reads other tokens"),
                               (["loss.uld_top_k=0"], "loss.uld_top_k must be >= 1"),
                               (["loss.uld_weight=0.5"], "uld_weight weighs hybrid's ULD spans"),
                               (["loss.cross_tokenizer=hybrid", "loss.uld_weight=-1"], "uld_weight"),
                               (["loss.cross_tokenizer=mined", "loss.divergence=reverse_kl"], "takes the log of the mapped teacher"),
                               (["loss.cross_tokenizer=mined", "loss.divergence=taid"], "takes the log of the mapped teacher"),
                               (["loss.cross_tokenizer=mined", "loss.uld_weight=0.5"], "uld_weight"),
                               (["loss.cross_tokenizer=wasserstein"], "cross_tokenizer")):
        with pytest.raises(DistillError, match=message):
            config(*overrides)


def test_feature_terms_across_tokenizers_are_refused_before_any_model_loads(demo_assets, unigram_dir, pair, tmp_path,
                                                                            capsys):
    from distill.models.from_scratch import init_model
    from ranks import ROOT

    from distill.train.launch import main

    student = init_model(tmp_path / "student", unigram_dir, layers=1, d_model=64, ffn=128, heads=4)
    capsys.readouterr()
    code = main(["--config", str(ROOT / "recipes/demo/kd.yaml"), *pair, f"student.path={student}",
                 "loss.cross_tokenizer=hybrid", "loss.w_hid=1", "loss.hidden.projection=true", "loss.hidden.map=uniform",
                 f"training.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "its spans are not one-to-one" in err[0], err
    assert not (tmp_path / "run").exists()


def test_the_benchmarks_nll_per_span_adds_up_to_each_models_nll_on_the_aligned_rows(demo_assets, unigram_dir,
                                                                                     tmp_path):
    """benchmarks/cross_tokenizer_real.py's diagnostic splits each model's validation NLL between the spans both
    vocabularies write as one token and the others: on either side, the parts add up to the model's own NLL over
    the target rows the spans cover (the rows up to where the two texts part, less the start token)."""
    import sys

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from distill.config.parsing import load_config
    from distill.data.collate import Seq2SeqCollator
    from distill.data.loading import load_split
    from distill.data.token_alignment import CrossTokenizerCollator, SharedVocab, teacher_view
    from distill.models.from_scratch import init_model

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from benchmarks.cross_tokenizer_real import RECIPES, span_nll

    student = init_model(tmp_path / "student", unigram_dir, layers=1, d_model=64, ffn=128, heads=4)
    settings = [f"data.path={demo_assets['data']}", "data.max_eval_samples=20", "data.eval_split=validation"]
    got = span_nll({"teacher": (demo_assets["teacher"], "A"), "student": (student, "B")}, unigram_dir,
                   demo_assets["teacher"], settings, batch=8)
    data = load_config(RECIPES / "baseline.yaml", settings).data
    rows = list(load_split(data, "validation", "eval"))
    b, a = AutoTokenizer.from_pretrained(unigram_dir), AutoTokenizer.from_pretrained(demo_assets["teacher"])
    full = CrossTokenizerCollator(Seq2SeqCollator(b, data, b.eos_token_id), Seq2SeqCollator(a, data, a.eos_token_id),
                                  SharedVocab.of(b, a, len(b), len(a)))(rows)  # one batch, not got's batches of 8
    for name, path, batch in (("teacher", demo_assets["teacher"], teacher_view(full)), ("student", student, full)):
        model = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           decoder_input_ids=batch["decoder_input_ids"]).logits
        nll = F.cross_entropy(logits.double().flatten(0, 1), batch["labels"].flatten(), reduction="none")
        rows_nll = nll[batch["target_index"]]
        covered = torch.cat([batch["span_first"], batch["span_rest"]])
        g = got[name]
        assert g["split_spans"] > 0 and g["shared_spans"] > 0
        assert g["shared_spans"] + g["split_spans"] == len(full["span_exact"])
        parts = g["shared"] * g["shared_spans"] + g["split"] * g["split_spans"]
        assert math.isclose(parts, float(rows_nll[covered].sum()), rel_tol=1e-5)
        assert len(covered.unique()) == len(covered) > 0.5 * len(rows_nll)
