"""Attention distributions (MiniLM, MiniEnD), rebuilt from the captured queries and keys."""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor

from distill.errors import DistillError
from distill.losses.features import attention_log_probs, map_kl, row_slice
from distill.losses.terms.base import (SITE_STACK, STACK_COUNT, Output, Term, layer_request, register,
                                       stack_depths_of, stack_index)
from distill.models.architectures import attention_dims, layer_kind
from distill.models.capture import AttentionInputs
from distill.models.layer_maps import resolve_layer


@register
class AttentionMaps(Term):
    """``attn``: for each site of ``loss.attention.sites``, part ``attn/<site>`` = KL(teacher ‖ student)
    between the attention distributions of one layer pair per head, averaged over heads, then a mean
    over query rows = tokens (encoder_self: source tokens; decoder sites: target tokens). Head counts
    must match; ``loss.relation`` works across them."""

    name = "attn"

    def __init__(self, cfg, total_steps, student_config, teacher_config):
        super().__init__(cfg, total_steps, student_config, teacher_config)
        a = cfg.attention
        self.layers: dict[str, tuple[int, int]] = {}  # site -> (student layer, teacher layer)
        for site in a.sites:
            stack = SITE_STACK[site]
            n_s, n_t = stack_depths_of(student_config, teacher_config, stack, f"loss.attention.sites '{site}'")
            s_heads, t_heads = attention_dims(student_config, stack)[0], attention_dims(teacher_config, stack)[0]
            if s_heads != t_heads:
                raise DistillError(f"loss.attention compares {site} attention head by head, but the student has "
                                   f"{s_heads} heads and the teacher {t_heads}; loss.relation (MiniLMv2) works "
                                   "across head counts")
            self.layers[site] = (resolve_layer(a.student_layer, n_s, "loss.attention.student_layer"),
                                 resolve_layer(a.teacher_layer, n_t, "loss.attention.teacher_layer"))
            kinds = [layer_kind(c, stack, layer) for c, layer in zip((student_config, teacher_config), self.layers[site])]
            if kinds[0] != kinds[1]:  # a window hides keys from one side only: an infinite KL
                raise DistillError(f"loss.attention compares the student's {site} layer {self.layers[site][0]} "
                                   f"({kinds[0]}) with the teacher's layer {self.layers[site][1]} ({kinds[1]}): pick "
                                   "layers of the same kind with loss.attention.student_layer / teacher_layer")
            self.parts[f"attn/{site}"] = STACK_COUNT[stack]
        self.student_request = layer_request(attention=[(site, i) for site, (i, _) in self.layers.items()])
        self.teacher_request = layer_request(attention=[(site, j) for site, (_, j) in self.layers.items()])

    def __call__(self, batch: dict[str, Tensor], student: Output, teacher: Optional[Output]) -> dict[str, Tensor]:
        out = {}
        for site, (i, j) in self.layers.items():
            a_s = student.features.attention[(site, i)]
            s_maps, s_inputs = attention_maps(a_s)
            t_maps, t_inputs = attention_maps(teacher.features.attention[(site, j)])
            out[f"attn/{site}"] = map_kl(s_maps, lambda sl, t_maps=t_maps, t_inputs=t_inputs: t_maps(t_inputs, sl),
                                         s_inputs, stack_index(batch, SITE_STACK[site]), a_s.query.shape[2])
        return out


def attention_maps(a: AttentionInputs) -> tuple[Callable[[tuple[Tensor, ...], slice], Tensor], tuple[Tensor, ...]]:
    """(maps(inputs, rows_slice), inputs) of one captured attention call, for ``map_kl``: the
    tensors a gradient may flow to are inputs (T5's learned position bias among them)."""
    inputs: tuple[Any, ...] = (a.query, a.key) + (() if a.position_bias is None else (a.position_bias,))

    def maps(ins: tuple[Tensor, ...], rows: slice) -> Tensor:
        bias = row_slice(ins[2], rows) if len(ins) > 2 else None
        return attention_log_probs(ins[0][:, :, rows], ins[1], row_slice(a.keep, rows), a.scaling, bias)
    return maps, inputs
