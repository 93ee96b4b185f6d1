"""The examples a run trains and evaluates on, and the collators that make batches of them."""

from __future__ import annotations

from typing import Any, Optional

from distill.config.settings import RunConfig
from distill.data.collate import CausalCollator, Seq2SeqCollator
from distill.data.loading import drop_overlong, load_split
from distill.data.objectives import TextObjectiveCollator, text_blocks
from distill.data.teacher_cache import split_digest


def examples(cfg: RunConfig, tokenizer) -> tuple[Any, Optional[Any], dict[str, Any]]:
    """The training and evaluation examples, and what identifies the training split's text (a checkpoint
    records it: a resume on other data is noticed). Raw text is cut into blocks, each one example; with
    data.truncation off, pairs over the length limits are dropped."""
    data = cfg.data
    train = load_split(data, data.train_split, "train")
    evaluation = load_split(data, data.eval_split, "eval") if data.eval_split else None
    identity = {"examples": len(train), "text": split_digest(
        train, [c for c in (data.source_column, data.target_column) if c is not None])}
    if data.objective is not None:
        causal = data.objective == "causal"
        train = text_blocks(train, tokenizer, data, causal)
        evaluation = text_blocks(evaluation, tokenizer, data, causal) if evaluation is not None else None
    elif not data.truncation:
        train = drop_overlong(train, data, tokenizer)
        evaluation = drop_overlong(evaluation, data, tokenizer) if evaluation is not None else None
    return train, evaluation, identity


def collator(tokenizer, config, cfg: RunConfig):
    """The collator of one model's batches: a text objective's, or the pairs' for the model's kind."""
    if cfg.data.objective is not None:
        return TextObjectiveCollator(tokenizer, cfg.data, cfg.training.seed, getattr(config, "decoder_start_token_id", None))
    return (Seq2SeqCollator(tokenizer, cfg.data, config.decoder_start_token_id) if config.is_encoder_decoder
            else CausalCollator(tokenizer, cfg.data))
