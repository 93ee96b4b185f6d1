"""A tokenizer and a model for a corpus with no pretrained model: ``distill train-tokenizer`` trains a
byte-level BPE or a SentencePiece-style Unigram on a dataset's text, ``distill init-model`` saves a randomly
initialised model of a chosen family and size for it (pretrain it with ``data.objective``). The demo builds its teacher this way, and so can a user with
a corpus of their own (``benchmarks/quality.py`` trains its teacher from one).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from distill.errors import DistillError
from distill.files import building

# BART's special tokens, in id order: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4.
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
MODEL_MAX_LENGTH = 512
TOKENIZER_KINDS = ("bpe", "unigram")


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1024, kind: str = "bpe",
                    sentinels: int = 0):
    """Train a tokenizer on ``texts`` and save it as a ``PreTrainedTokenizerFast`` directory: a byte-level
    BPE (``kind`` "bpe", GPT-2/LLaMA-3 style) or a Unigram with byte fallback (``kind`` "unigram",
    SentencePiece/LLaMA-2 style: ``▁`` marks spaces, characters it has no piece for become ``<0xNN>`` bytes).

    Special tokens follow BART (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4); encoding a text gives
    ``<s> ... </s>``; decoding with ``skip_special_tokens=True`` returns the original text exactly.
    ``sentinels``: that many T5 span-corruption sentinels ``<extra_id_N>`` after the vocabulary, as T5 orders
    them (``<extra_id_0>`` last).
    """
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in TOKENIZER_KINDS:
        raise DistillError(f"train_tokenizer: kind must be one of {', '.join(TOKENIZER_KINDS)}, got {kind!r}")
    if kind == "bpe" and vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DistillError(f"train_tokenizer: vocab_size must be >= 261 (bytes + specials), got {vocab_size}")
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        # Always prepend one space (and strip exactly one on decode) so a word is the same token at the
        # start of a text as inside it ("Anna" -> "ĠAnna" in both), while the round trip stays exact.
        tok.normalizer = normalizers.Prepend(" ")
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()  # "▁" before every word, the first one included
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token="<unk>",
                                          show_progress=False)
    tok.train_from_iterator((t for t in texts), trainer=trainer)
    if kind == "unigram":  # the 256 byte pieces, scored below every trained piece
        pieces = [tuple(p) for p in json.loads(tok.to_str())["model"]["vocab"]]
        floor = min(score for _, score in pieces) - 10.0
        tok.model = models.Unigram(pieces + [(f"<0x{b:02X}>", floor) for b in range(256)],
                                   unk_id=SPECIAL_TOKENS.index("<unk>"), byte_fallback=True)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:  # pragma: no cover - guaranteed by the trainer
            raise DistillError(f"train_tokenizer: special token {t} got id {tok.token_to_id(t)}, expected {i}")
    if sentinels < 0:
        raise DistillError(f"train_tokenizer: sentinels must be >= 0, got {sentinels}")
    tok.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(sentinels))])
    bos, eos = ("<s>", 0), ("</s>", 2)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[bos, eos]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    with building(Path(out_dir)) as tmp:
        hf_tok.save_pretrained(str(tmp))
    return hf_tok



FAMILIES = ("bart", "t5", "bert", "roberta", "modernbert", "llama")


def init_model(
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    family: str = "bart",
    layers: int = 6,
    d_model: int = 128,
    ffn: int = 256,
    heads: int = 4,
    seed: int = 0,
    max_positions: int = MODEL_MAX_LENGTH,
) -> Path:
    """Save a randomly initialised model of ``family`` for ``tokenizer_dir``'s vocabulary (+ the tokenizer,
    and a greedy generation config for the models that generate) to ``out_dir``, atomically: a BART or T5
    encoder-decoder with ``layers`` layers in each stack, a BERT / RoBERTa / ModernBERT masked LM or a
    LLaMA-style decoder. Same arguments -> identical weights. Returns ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from distill.models.loading import auto_class

    if family not in FAMILIES:
        raise DistillError(f"init_model: family must be one of {', '.join(FAMILIES)}, got {family!r}")
    for name, value in (("layers", layers), ("d_model", d_model), ("ffn", ffn), ("heads", heads),
                        ("max_positions", max_positions)):
        if value < 1:
            raise DistillError(f"init_model: {name} must be >= 1, got {value}")
    if d_model % heads:
        raise DistillError(f"init_model: d_model={d_model} is not divisible by heads={heads}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as exc:  # noqa: BLE001 - reported as one line
        raise DistillError(f"init_model: cannot load tokenizer from {tokenizer_dir}: {exc}") from exc
    n_tok = len(tokenizer)
    vocab_size = -(-n_tok // 8) * 8
    config = _config(family, tokenizer, vocab_size, layers, d_model, ffn, heads, max_positions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_class(config).from_config(config)
    gen = None
    if family in ("bart", "t5", "llama"):
        start = config.decoder_start_token_id if config.is_encoder_decoder else None
        gen = GenerationConfig(
            num_beams=1,
            do_sample=False,
            max_length=64,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=start,
            forced_bos_token_id=None,
            forced_eos_token_id=tokenizer.eos_token_id if family == "bart" else None,
            # never generate the padding rows that exist only to round the embedding matrix
            suppress_tokens=list(range(n_tok, vocab_size)) or None,
        )
        model.generation_config = gen

    final = Path(out_dir)
    with building(final) as tmp:
        model.save_pretrained(str(tmp))
        if gen is not None:
            gen.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return final


def _config(family: str, tokenizer, vocab_size: int, layers: int, d_model: int, ffn: int, heads: int,
            max_positions: int):
    """The transformers config of a fresh model of ``family`` at this size, with the tokenizer's special ids."""
    import transformers

    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    if family == "bart":
        return transformers.BartConfig(
            vocab_size=vocab_size, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
            encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
            max_position_embeddings=max_positions, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
            decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True, **ids)
    if family == "t5":  # T5 starts decoding from its padding token; relative positions need no table
        return transformers.T5Config(
            vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=ffn, num_layers=layers,
            num_decoder_layers=layers, num_heads=heads, dropout_rate=0.1, decoder_start_token_id=tokenizer.pad_token_id,
            **ids)
    encoder = dict(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=layers, num_attention_heads=heads,
                   intermediate_size=ffn, **ids)
    if family == "bert":
        return transformers.BertConfig(max_position_embeddings=max_positions, **encoder)
    if family == "roberta":  # RoBERTa's positions start after the padding index
        return transformers.RobertaConfig(max_position_embeddings=max_positions + tokenizer.pad_token_id + 1,
                                          **encoder)
    if family == "modernbert":
        return transformers.ModernBertConfig(max_position_embeddings=max_positions,
                                             cls_token_id=_either(tokenizer.cls_token_id, tokenizer.bos_token_id),
                                             sep_token_id=_either(tokenizer.sep_token_id, tokenizer.eos_token_id),
                                             **encoder)
    return transformers.LlamaConfig(max_position_embeddings=max_positions, num_key_value_heads=heads,
                                    tie_word_embeddings=True, **encoder)


def _either(value, default):
    return default if value is None else value
