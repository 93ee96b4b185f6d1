"""On-policy (GKD) batches: sampled targets take the exact shape the collators give dataset targets,
for decoder-only and encoder-decoder models; sampling is plain ancestral sampling from the student."""

import pytest
import torch

from distill.config.settings import DataConfig
from distill.data.collate import IGNORE_INDEX, CausalCollator, Seq2SeqCollator
from distill.train.on_policy import causal_batch, is_on_policy, prompts_of, sample_batch, sampling_config, seq2seq_targets, until_eos

ROWS = [{"prompt": "Where does Anna Berg live?", "response": "In Oslo."},
        {"prompt": "Peter owns", "response": "12 cats and 3 dogs."},
        {"prompt": "Maria works as a baker in Lisbon. Who works in Lisbon?", "response": "Maria."}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from distill.models.from_scratch import train_tokenizer

    out = tmp_path_factory.mktemp("on-policy-tok")
    train_tokenizer([r["prompt"] + " " + r["response"] for r in ROWS] * 20, out, vocab_size=300)
    return AutoTokenizer.from_pretrained(out)


def _cfg() -> DataConfig:
    return DataConfig(path="x", source_column="prompt", target_column="response", max_source_length=64,
                      max_target_length=32, chat_template=False)


def test_causal_batch_rebuilds_what_the_collator_gives(tok):
    """Prompts found in a collated batch plus its own responses give back the same batch."""
    batch = CausalCollator(tok, _cfg())(ROWS)
    prompts = prompts_of(batch)
    responses = [batch["input_ids"][i, len(p):int(batch["attention_mask"][i].sum())].tolist()
                 for i, p in enumerate(prompts)]
    assert prompts[1] == [tok.bos_token_id] + tok("Peter owns", add_special_tokens=False)["input_ids"]
    assert all(r[-1] == tok.eos_token_id for r in responses)
    rebuilt = causal_batch(prompts, responses, tok.pad_token_id)
    for key in ("input_ids", "attention_mask", "labels", "target_index", "source_index"):
        assert torch.equal(rebuilt[key], batch[key]), key
    real = batch["attention_mask"].bool()
    assert torch.equal(rebuilt["position_ids"][real], batch["position_ids"][real])


def test_seq2seq_targets_equal_the_collators(tok):
    batch = Seq2SeqCollator(tok, _cfg(), decoder_start_token_id=tok.eos_token_id)(ROWS)
    targets = [tok(text_target=r["response"])["input_ids"] for r in ROWS]
    sampled = seq2seq_targets(targets, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(sampled["labels"], batch["labels"])
    assert torch.equal(sampled["decoder_input_ids"], batch["decoder_input_ids"])
    assert torch.equal(sampled["target_index"], batch["target_index"])


def test_until_eos():
    assert until_eos([5, 6, 2, 7, 1], [2]) == [5, 6, 2]
    assert until_eos([5, 9, 6, 2], [2, 9]) == [5, 9]  # any of several EOS tokens
    assert until_eos([5, 6], [2]) == [5, 6]  # cut by max_new_tokens
    assert until_eos([], [2]) == [2]


def test_sampling_config_is_plain_sampling_with_the_models_structure():
    from transformers import GenerationConfig

    shipped = GenerationConfig(num_beams=4, min_length=56, max_length=142, no_repeat_ngram_size=3, length_penalty=2.0,
                               early_stopping=True, forced_bos_token_id=0, decoder_start_token_id=2, eos_token_id=2)
    config = sampling_config(shipped, max_new_tokens=16, temperature=0.7, pad_token_id=1, eos_token_id=2)
    config.validate(strict=True)
    assert config.do_sample and config.num_beams == 1 and config.temperature == 0.7 and config.max_new_tokens == 16
    assert config.top_k == 0 and config.top_p == 1.0 and config.min_length == 0 and config.no_repeat_ngram_size == 0
    assert (config.forced_bos_token_id, config.decoder_start_token_id, config.eos_token_id) == (0, 2, 2)
    assert shipped.num_beams == 4  # the model's own config is left alone
    assert sampling_config(GenerationConfig(), 4, 1.0, 1, eos_token_id=7).eos_token_id == 7


def test_on_policy_draws_are_seeded_and_near_the_fraction():
    draws = [is_on_policy(0.3, 0, step, micro) for step in range(200) for micro in range(4)]
    assert draws == [is_on_policy(0.3, 0, step, micro) for step in range(200) for micro in range(4)]
    assert 0.25 < sum(draws) / len(draws) < 0.35
    assert not any(is_on_policy(0.0, 0, s, 0) for s in range(50)) and all(is_on_policy(1.0, 0, s, 0) for s in range(50))


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask.flatten()).flatten()


def _sampling(model, tok, n=6):
    return sampling_config(model.generation_config, n, 1.0, tok.pad_token_id, tok.eos_token_id)


def test_seq2seq_sample_batch_keeps_sources_and_replaces_targets(tok):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=128)).eval()
    model.generation_config.forced_bos_token_id = tok.bos_token_id  # as bart-large-cnn's
    batch = Seq2SeqCollator(tok, _cfg(), model.config.decoder_start_token_id)(ROWS)
    torch.manual_seed(1)
    out = sample_batch(model, batch, _sampling(model, tok), synced_gpus=False)
    torch.manual_seed(1)
    reference = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               generation_config=_sampling(model, tok))
    assert torch.equal(out["input_ids"], batch["input_ids"]) and torch.equal(out["weight"], batch["weight"])
    # the row indices follow the sampled labels; the sources, and so their index, are the collator's
    assert torch.equal(out["target_index"], _flat_nonzero(out["labels"] != IGNORE_INDEX))
    assert torch.equal(out["source_index"], batch["source_index"])
    assert not torch.equal(out["labels"], batch["labels"])
    for i, row in enumerate(reference.tolist()):
        target = until_eos(row[1:], [tok.eos_token_id])
        assert target[0] == tok.bos_token_id  # the forced BOS is kept
        assert out["labels"][i, :len(target)].tolist() == target
        assert (out["labels"][i, len(target):] == IGNORE_INDEX).all()
        assert out["decoder_input_ids"][i, :len(target)].tolist() == [model.config.decoder_start_token_id] + target[:-1]
    # the student's forward takes the batch as it takes a collated one
    assert model(**{k: out[k] for k in ("input_ids", "attention_mask", "decoder_input_ids", "labels")}).loss.isfinite()


def test_causal_sample_batch_keeps_prompts_and_masks_them(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    batch = CausalCollator(tok, _cfg())(ROWS)
    prompts = prompts_of(batch)
    out = sample_batch(model, batch, _sampling(model, tok), synced_gpus=False)
    for i, prompt in enumerate(prompts):
        n = int(out["attention_mask"][i].sum())
        assert out["input_ids"][i, :len(prompt)].tolist() == prompt
        assert 1 <= n - len(prompt) <= 6
        targets = (out["labels"][i] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert targets == list(range(len(prompt) - 1, n - 1))  # the sampled response only
        assert out["labels"][i, targets].tolist() == out["input_ids"][i, len(prompt):n].tolist()
    assert torch.equal(out["target_index"], _flat_nonzero(out["labels"] != IGNORE_INDEX))
    assert torch.equal(out["source_index"], _flat_nonzero(out["attention_mask"] == 1))
