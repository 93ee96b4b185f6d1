"""A language model taken apart at its LM head: the trunk (every layer up to the final hidden states)
and ``Head``, which turns hidden rows into logits exactly as the model's own forward does. The losses
apply the head a chunk of rows at a time (``distill.losses.fused_head``), so no tensor of tokens ×
vocabulary is ever built for either model."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import DistillError
from distill.models.architectures import arch_spec, find_module

T = TypeVar("T")


@dataclass
class Head:
    """logits = softcap(F.linear(scale · h, weight, bias)), in the model's dtype up to the soft cap.

    * ``module``: the model's output embedding (``lm_head``); its weight may be tied to the input
      embedding, and may have more rows than the tokenizer has tokens (padded vocabularies: the extra
      logits are produced as the model produces them; pairs are cropped to the shared rows by the loss);
    * ``bias``: BART-family ``final_logits_bias`` (a buffer), or the head's own bias;
    * ``scale``: T5's ``d_model**-0.5`` on the decoder output when the embeddings are tied;
    * ``softcap``: Gemma-style final soft-capping, ``cap · tanh(z / cap)``;
    * ``transform``: a masked LM's head before its vocabulary matrix (BERT: dense, activation, LayerNorm),
      applied by ``prepare`` to the rows the loss reads, never to the whole sequence.

    Every method takes rows already through ``prepare``.
    """

    module: nn.Module
    bias: Optional[Tensor] = None
    scale: float = 1.0
    softcap: Optional[float] = None
    transform: Optional[Callable[[Tensor], Tensor]] = None

    def prepare(self, hidden: Tensor) -> Tensor:
        """The head's input rows from final hidden rows. Under ZeRO-3 the transform's modules gather their
        own weights, so a model runs it inside its engine's forward, as ``FeatureModel`` does."""
        return hidden if self.transform is None else self.transform(hidden)

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def vocab(self) -> int:
        return self.weight.shape[0] if self.weight.numel() else int(self.weight.ds_shape[0])

    def linear(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], vocab_block: Optional[int] = None,
               out: Optional[Tensor] = None) -> Tensor:
        """The head's matmul in the model's dtype (the soft cap is ``cap``, applied by the loss in float32).
        ``vocab_block``: compute it that many weight rows at a time (see ``fused_head.VOCAB_BLOCK``); ``out``:
        a (rows, vocab) buffer to write it into (the chunked pass reuses one across chunks)."""
        x = hidden * self.scale if self.scale != 1.0 else hidden
        vocab = weight.shape[0]
        if vocab_block is None or vocab_block >= vocab:
            if out is None:
                return F.linear(x, weight, bias)
            return torch.mm(x, weight.t(), out=out) if bias is None else torch.addmm(bias, x, weight.t(), out=out)
        out = x.new_empty(x.shape[0], vocab) if out is None else out
        # each block as weight rows @ hᵀ, then transposed into place: at a chunk's shape MKL runs this
        # orientation 1.2-1.3x faster than h @ blockᵀ (BENCHMARKS.md), and the copy is a small part of it
        x_t, block = x.t().contiguous(), x.new_empty(min(vocab_block, vocab), x.shape[0])
        for start in range(0, vocab, vocab_block):
            cols = slice(start, min(start + vocab_block, vocab))
            part = block[:cols.stop - start]
            if bias is None:
                torch.mm(weight[cols], x_t, out=part)
            else:
                torch.addmm(bias[cols, None], weight[cols], x_t, out=part)
            out[:, cols].copy_(part.t())
        return out

    def cap(self, logits: Tensor) -> Tensor:
        return logits if self.softcap is None else self.softcap * torch.tanh(logits / self.softcap)

    def logits(self, hidden: Tensor) -> Tensor:
        """All logits of ``hidden`` at once, as the model computes them (tests and reference paths)."""
        with self.weights() as (weight, bias):
            return self.cap(self.linear(hidden, weight, bias).float())

    def call(self, fn: Callable[[Tensor, Optional[Tensor], Tensor], T], hidden: Tensor) -> T:
        """``fn(weight, bias, hidden)``, run as the head module's own forward: under ZeRO-3 the module's
        hooks gather the partitioned weight for it and, in the backward, gather it again and reduce-scatter
        its gradient into the partition, once per micro-batch, as for the model's own head. So a model
        calls it inside its engine's forward (``FeatureModel``'s ``loss``); another model's head, whose
        engine is not running, is read through ``weights``."""
        module = self.module
        module.forward = lambda h: fn(module.weight, self._bias(), h)  # an instance attribute shadows the class's
        try:
            return module(hidden)
        finally:
            del module.forward

    def _bias(self) -> Optional[Tensor]:
        return None if self.bias is None else self.bias.reshape(-1)

    @contextmanager
    def weights(self) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
        """(weight, bias), gathered read-only while inside when ZeRO-3 partitions them."""
        params = [p for p in (self.weight, self.bias) if p is not None and hasattr(p, "ds_id")]
        if not params:
            yield self.weight, self._bias()
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield self.weight, self._bias()


def head_of(model: nn.Module) -> Head:
    """The ``Head`` of a Hugging Face *ForConditionalGeneration / *ForCausalLM / *ForMaskedLM model."""
    module = model.get_output_embeddings()
    if module is None or not hasattr(module, "weight"):
        raise DistillError(f"{type(model).__name__} has no LM head to distill logits through")
    config = model.config
    bias = getattr(model, "final_logits_bias", None)
    if bias is None:
        bias = getattr(module, "bias", None)
    scale = 1.0
    if model.config.is_encoder_decoder and arch_spec(config).family == "t5":
        # transformers 5 names it scale_decoder_outputs; older configs only say tie_word_embeddings
        tied = getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True))
        scale = config.d_model ** -0.5 if tied else 1.0
    softcap = getattr(config, "final_logit_softcapping", None)
    return Head(module, bias, scale, float(softcap) if softcap else None, _transform(model))


def _transform(model: nn.Module) -> Optional[Callable[[Tensor], Tensor]]:
    """The masked LM head's steps before its vocabulary matrix (``ArchSpec.head_transform``), as one call."""
    from transformers.activations import ACT2FN

    steps = []
    for name in arch_spec(model.config).head_transform:
        found = find_module(model, name) if name not in ACT2FN else (name, ACT2FN[name])
        if found is None:
            raise DistillError(f"cannot find the {name} of {type(model).__name__}'s masked LM head")
        steps.append(found[1])
    if not steps:
        return None

    def transform(hidden: Tensor) -> Tensor:
        for step in steps:
            hidden = step(hidden)
        return hidden
    return transform


def trunk(model: nn.Module, **inputs: Any) -> tuple[Tensor, Optional[Tensor]]:
    """(final hidden states of the decoder, the encoder's last hidden state or None): the model's
    forward without its head. Task models keep the layers in a base model (``model.model``,
    ``model.transformer``); T5-style models run their encoder and decoder themselves."""
    base = model.base_model
    if base is not model:
        out = base(**inputs)
        return out.last_hidden_state, getattr(out, "encoder_last_hidden_state", None)
    if not getattr(model.config, "is_encoder_decoder", False):
        raise DistillError(f"cannot find the layers below the LM head of {type(model).__name__}")
    encoded = inputs.get("encoder_outputs")
    if encoded is None:
        encoded = model.get_encoder()(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
    decoded = model.get_decoder()(input_ids=inputs["decoder_input_ids"],
                                  attention_mask=inputs.get("decoder_attention_mask"),
                                  encoder_hidden_states=encoded[0], encoder_attention_mask=inputs.get("attention_mask"),
                                  use_cache=False)
    return decoded[0], encoded[0]
