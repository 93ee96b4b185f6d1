"""Decoder-only data: labels aligned with the logits, chat-template splits, masks proved by perturbing
logits, packed rows equivalent to examples run alone, truncation, and clear errors for bad input."""

import json

import pytest
import torch

from distill.config.settings import DataConfig
from distill.data.collate import IGNORE_INDEX, CausalCollator, Seq2SeqCollator, causal_model_inputs
from distill.data.stream import eval_loader
from distill.data.loading import load_split
from distill.errors import DistillError
from test_losses import cross_entropy, logit_divergence  # the fused pass with identity heads

SENTENCES = ["Anna Berg lives in Oslo.", "The weather in Oslo was warm.", "Peter owns 12 cats and 3 dogs.",
             "Maria works as a baker in Lisbon.", "Summarize the text about Peter and his cats."]
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ROWS = [{"prompt": "Where does Anna Berg live?", "response": "In Oslo."},
        {"prompt": "Peter owns", "response": "12 cats."},
        {"prompt": "Maria works as a baker in Lisbon. Who works in Lisbon?", "response": "Maria, as a baker."},
        {"prompt": "Weather?", "response": "Warm in Oslo."}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from distill.models.from_scratch import train_tokenizer

    out = tmp_path_factory.mktemp("causal-tok")
    train_tokenizer(SENTENCES * 20, out, vocab_size=300)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    """BART-style specials (<s>=0, <pad>=1, </s>=2), no chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def _chat_tokenizer(tok_dir, template: str = TEMPLATE):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tok_dir)
    t.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    t.chat_template = template
    return t


def _cfg(**kw) -> DataConfig:
    base = dict(path="x", source_column="prompt", target_column="response", max_source_length=64,
                max_target_length=32)
    return DataConfig(**{**base, **kw})


def _llama(vocab: int, seed: int, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _real(batch, b: int) -> int:
    return int(batch["attention_mask"][b].sum())


def test_labels_are_the_next_response_token(tok):
    batch = CausalCollator(tok, _cfg(chat_template=False))(ROWS[:2])
    for b, row in enumerate(ROWS[:2]):
        prompt = [tok.bos_token_id] + _ids(tok, row["prompt"])
        response = _ids(tok, row["response"]) + [tok.eos_token_id]
        ids = prompt + response
        n = len(ids)
        assert batch["input_ids"][b, :n].tolist() == ids
        assert _real(batch, b) == n
        assert batch["position_ids"][b, :n].tolist() == list(range(n))
        # the logits at t predict token t+1: targets from the last prompt position to the one before the EOS
        expected = [ids[t + 1] if t >= len(prompt) - 1 and t < n - 1 else IGNORE_INDEX
                    for t in range(batch["labels"].shape[1])]
        assert batch["labels"][b].tolist() == expected
        assert (batch["input_ids"][b, n:] == tok.pad_token_id).all()
    assert batch["weight"].tolist() == [1.0, 1.0]
    assert batch["labels"].dtype == torch.long and batch["input_ids"].shape == batch["labels"].shape


def test_loss_on_prompt_and_plain_text_target_every_next_token(tok):
    for cfg, rows in [(_cfg(chat_template=False, loss_on_prompt=True), ROWS[:2]),
                      (_cfg(target_column=None, source_column="text"), [{"text": s} for s in SENTENCES[:2]])]:
        batch = CausalCollator(tok, cfg)(rows)
        for b in range(len(rows)):
            n = _real(batch, b)
            ids = batch["input_ids"][b, :n].tolist()
            assert batch["labels"][b].tolist() == ids[1:] + [IGNORE_INDEX] * (batch["labels"].shape[1] - n + 1)
    text = SENTENCES[0]
    assert batch["input_ids"][0, :_real(batch, 0)].tolist() == [tok.bos_token_id] + _ids(tok, text) + [tok.eos_token_id]


def test_chat_template_splits_prompt_and_response(tok_dir):
    t = _chat_tokenizer(tok_dir)
    row = ROWS[0]
    ids, targets = CausalCollator(t, _cfg()).encode(row)
    head = _ids(t, "<|user|>" + row["prompt"] + "<|end|><|assistant|>")
    assert ids[:len(head)] == head and targets == [False] * len(head) + [True] * (len(ids) - len(head))
    batch = CausalCollator(t, _cfg())([row, ROWS[1]])
    labels = batch["labels"][0]
    assert t.decode(labels[labels != IGNORE_INDEX]) == row["response"] + "<|end|>"
    assert labels.tolist().index(ids[len(head)]) == len(head) - 1  # first target at the generation prompt
    # chat_template: false formats the same tokenizer without the template
    plain = CausalCollator(t, _cfg(chat_template=False)).encode(row)[0]
    assert plain == [t.bos_token_id] + _ids(t, row["prompt"]) + _ids(t, row["response"]) + [t.eos_token_id]


def test_chat_template_that_breaks_token_prefix_falls_back_to_text(tok_dir):
    # The generation prompt ends in a space that BPE merges into the response's first word.
    t = _chat_tokenizer(tok_dir, "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                                 "{% if add_generation_prompt %}assistant: {% endif %}")
    row = {"prompt": "Where does Anna Berg live?", "response": "Oslo."}  # "ĠOslo" is one token
    head = "user: " + row["prompt"] + "\nassistant: "
    assert _ids(t, head + row["response"] + "\n")[:len(_ids(t, head))] != _ids(t, head)  # the premise
    ids, targets = CausalCollator(t, _cfg()).encode(row)
    n = len(_ids(t, head))
    assert ids[:n] == _ids(t, head) and ids[n:] == _ids(t, row["response"] + "\n")
    assert targets == [False] * n + [True] * (len(ids) - n)
    bad = _chat_tokenizer(tok_dir, "{% for m in messages %}{{ m.content }}|{% endfor %}"
                                   "{% if add_generation_prompt %}>>{% endif %}")
    with pytest.raises(DistillError, match="chat template does not render the prompt"):
        CausalCollator(bad, _cfg())([row])


def test_prompt_positions_do_not_reach_the_losses(tok):
    batch = CausalCollator(tok, _cfg(chat_template=False))(ROWS)
    student, teacher = _llama(len(tok), 0), _llama(len(tok), 1)
    with torch.no_grad():
        s = student(**causal_model_inputs(batch, packed=False)).logits
        t = teacher(**causal_model_inputs(batch, packed=False)).logits
    labels = batch["labels"]
    mask = labels != IGNORE_INDEX

    def losses(s, t):
        index = batch["target_index"]
        return logit_divergence(s, t, index, "forward_kl", temperature=2.0), cross_entropy(s, labels, index)

    kd, ce = losses(s, t)
    prompt = ~mask & batch["attention_mask"].bool()
    assert prompt.sum() > 10 and mask.sum() > 10 and kd > 0
    g = torch.Generator().manual_seed(0)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 50 * torch.randn(s2[~mask].shape, generator=g)
    t2[~mask] = 50 * torch.randn(t2[~mask].shape, generator=g)
    kd2, ce2 = losses(s2, t2)
    assert torch.equal(kd, kd2) and torch.equal(ce, ce2)
    # and a response position does count
    b, i = mask.nonzero()[0].tolist()
    s2[b, i] += 5 * torch.randn(s.shape[-1], generator=g)
    kd3, ce3 = losses(s2, t2)
    assert kd3 != kd and ce3 != ce


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_match_examples_run_alone(tok, attn):
    rows = ROWS[:3] + [{"prompt": "A very long question. " * 6, "response": "x"}]
    cfg = _cfg(chat_template=False, packing=True)
    single = CausalCollator(tok, _cfg(chat_template=False))
    lengths = [len(single.encode(r)[0]) for r in rows]
    pack_length = sum(lengths[:3])
    assert lengths[3] > pack_length - lengths[0]  # the last one cannot join the first row
    batch = CausalCollator(tok, cfg, pack_length=pack_length)(rows)
    assert batch["input_ids"].shape == (2, max(pack_length, lengths[3]))
    inputs = causal_model_inputs(batch, packed=True)
    assert inputs["attention_mask"] is None and inputs["use_cache"] is False
    assert torch.equal(causal_model_inputs(single(rows), packed=False)["attention_mask"], single(rows)["attention_mask"])
    model = _llama(len(tok), 0, attn)
    with torch.no_grad():
        packed = model(**inputs).logits
        spans, start = [], 0
        for i, row in enumerate(rows):
            b, start = (0, start) if i < 3 else (1, 0)
            alone = single([row])
            n = lengths[i]
            assert torch.equal(batch["labels"][b, start:start + n], alone["labels"][0, :n])
            assert batch["position_ids"][b, start:start + n].tolist() == list(range(n))
            ref = model(**causal_model_inputs(alone, packed=False)).logits[0, :n]
            torch.testing.assert_close(packed[b, start:start + n], ref, atol=1e-5, rtol=0)
            spans.append((b, start, n))
            start += n
        # new tokens for the middle example change its logits and nobody else's
        b, start, n = spans[1]
        changed = {k: v.clone() for k, v in batch.items()}
        g = torch.Generator().manual_seed(1)
        changed["input_ids"][b, start:start + n] = torch.randint(5, len(tok), (n,), generator=g)
        other = model(**causal_model_inputs(changed, packed=True)).logits
    assert not torch.allclose(other[b, start:start + n], packed[b, start:start + n], atol=1e-3)
    for j in (0, 2):
        b, start, n = spans[j]
        torch.testing.assert_close(other[b, start:start + n], packed[b, start:start + n], atol=1e-6, rtol=0)


def test_packing_run_needs_no_mask_for_rows_of_one_example(tok):
    """A packing run's batch may hold no row of two examples; None (from the config's flag) is still right."""
    batch = CausalCollator(tok, _cfg(chat_template=False, packing=True), pack_length=1)(ROWS)
    assert batch["input_ids"].shape[0] == len(ROWS)  # one example per row, right-padded
    model = _llama(len(tok), 0)
    with torch.no_grad():
        unmasked = model(**causal_model_inputs(batch, packed=True)).logits
        masked = model(**causal_model_inputs(batch, packed=False)).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(unmasked[real], masked[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["seq2seq", "causal", "packed", "loss_on_prompt", "plain_text"])
def test_row_indices_are_the_masks_nonzero(tok, kind):
    """``target_index`` and ``source_index``, built on the host, are the flat positions of the targets and
    of the real tokens, in training and evaluation batches alike."""
    rows = [{**r, "text": r["prompt"]} for r in ROWS]
    cfg = {"loss_on_prompt": _cfg(chat_template=False, loss_on_prompt=True),
           "packed": _cfg(chat_template=False, packing=True),
           "plain_text": _cfg(target_column=None, source_column="text")}.get(kind, _cfg(chat_template=False))
    collate = Seq2SeqCollator(tok, cfg, decoder_start_token_id=2) if kind == "seq2seq" else CausalCollator(tok, cfg)
    batches = [collate(rows), *eval_loader(rows, collate, batch_size=2, rank=1, world_size=3)]
    for batch in batches:
        targets, real = batch["labels"] != IGNORE_INDEX, batch["attention_mask"] == 1
        assert torch.equal(batch["target_index"], torch.nonzero(targets.flatten()).flatten())
        assert torch.equal(batch["source_index"], torch.nonzero(real.flatten()).flatten())
        assert batch["target_index"].device.type == batch["source_index"].device.type == "cpu"
        assert torch.equal(batch["labels"].view(-1)[batch["target_index"]], batch["labels"][targets])
    assert batches[0]["target_index"].numel() > 0
    if kind == "packed":
        assert batches[0]["input_ids"].shape[0] < len(rows)


def test_packing_keeps_eval_padding_rows_apart(tok):
    rows = [{"prompt": f"Question {i}?", "response": "Oslo."} for i in range(3)]
    collate = CausalCollator(tok, _cfg(chat_template=False, packing=True))
    batches = list(eval_loader(rows, collate, batch_size=4, rank=1, world_size=2))  # row 1, then row 0 as padding
    assert len(batches) == 1 and batches[0]["weight"].tolist() == [1.0, 0.0]
    assert batches[0]["attention_mask"].sum(1).tolist()[1] == len(collate.encode(rows[0])[0])


def test_truncation_keeps_the_end_of_the_prompt(tok):
    row = {"prompt": "Anna Berg lives in Oslo. Maria works as a baker in Lisbon.", "response": "Peter owns 12 cats."}
    body, response = _ids(tok, row["prompt"]), _ids(tok, row["response"])
    assert len(body) > 8 and len(response) > 4
    collate = CausalCollator(tok, _cfg(chat_template=False, max_source_length=6, max_target_length=4))
    ids, targets = collate.encode(row)
    assert ids == [tok.bos_token_id] + body[-5:] + response[:4]  # BOS kept; the EOS was cut with the response
    assert targets == [False] * 6 + [True] * 4
    plain = CausalCollator(tok, _cfg(target_column=None, source_column="prompt", max_source_length=3,
                                     max_target_length=2)).encode(row)[0]
    assert plain == [tok.bos_token_id] + body[:4]


def test_bad_input_is_one_clear_line(tmp_path, tok):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": "Where?", "answer": "Oslo."}) + "\n" for _ in range(3)))
    with pytest.raises(DistillError, match="data.source_column 'prompt' is not a column") as err:
        load_split(DataConfig(path=str(data), source_column="prompt", target_column="answer"), "train", "train")
    assert "\n" not in str(err.value)
    plain = DataConfig(path=str(data), source_column="question", target_column=None)
    plain.validate("data")
    assert len(load_split(plain, "train", "train")) == 3  # no target column to look for
    with pytest.raises(DistillError, match="target_column is empty"):
        DataConfig(path="x", target_column="").validate("data")
    with pytest.raises(DistillError, match="both 'a'"):
        DataConfig(path="x", source_column="a", target_column="a").validate("data")
    with pytest.raises(DistillError, match="only decoder-only models"):
        Seq2SeqCollator(tok, plain, decoder_start_token_id=2)
