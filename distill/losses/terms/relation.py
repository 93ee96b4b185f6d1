"""Self-attention relations: MiniLMv2 (Q-Q, K-K, V-V) and DirectMiniLM."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from distill.errors import DistillError
from distill.losses.features import common_keep, concat_heads, hidden_distance, map_kl, relation_log_probs
from distill.losses.terms.base import (QKV, SITE_STACK, STACK_COUNT, Output, Term, layer_request, qkv_width,
                                       register, stack_depths_of, stack_index)
from distill.models.capture import Features
from distill.models.layer_maps import resolve_layer


@register
class Relations(Term):
    """``rel``: for each site of ``loss.relation.sites``, part ``rel/<site>`` = the sum over
    ``loss.relation.kinds`` (q, k, v) of, with ``metric: kl`` (MiniLMv2), KL(teacher ‖ student) between
    the relations softmax(x·xᵀ/√d_r) re-split into ``heads`` relation heads, averaged over heads, or
    with ``metric: mse`` (DirectMiniLM) the mean over the width of the squared difference of the
    (optionally projected, ``rel_<site>_<kind>``) student Q/K/V and the teacher's; both a mean over
    query rows = tokens (encoder_self: source tokens; decoder_self: target tokens)."""

    name = "rel"

    def __init__(self, cfg, total_steps, student_config, teacher_config):
        super().__init__(cfg, total_steps, student_config, teacher_config)
        r = cfg.relation
        self.layers: dict[str, tuple[int, int]] = {}  # site -> (student layer, teacher layer)
        for site in r.sites:
            stack = SITE_STACK[site]
            n_s, n_t = stack_depths_of(student_config, teacher_config, stack, f"loss.relation.sites '{site}'")
            self.layers[site] = (resolve_layer(r.student_layer, n_s, "loss.relation.student_layer"),
                                 resolve_layer(r.teacher_layer, n_t, "loss.relation.teacher_layer"))
            self.parts[f"rel/{site}"] = STACK_COUNT[stack]
            for kind in r.kinds:
                widths = [qkv_width(c, stack, kind) for c in (student_config, teacher_config)]
                if r.metric == "kl":
                    for role, w in zip(("student", "teacher"), widths):
                        if w % r.heads:
                            raise DistillError(f"loss.relation.heads = {r.heads} does not divide the {role}'s "
                                               f"{site} {kind} width {w}")
                elif r.projection:
                    self.projection_shapes[f"rel_{site}_{kind}"] = (widths[0], widths[1])
                elif widths[0] != widths[1]:
                    raise DistillError(f"the {site} {kind} widths differ (student {widths[0]}, teacher "
                                       f"{widths[1]}): loss.relation.metric=mse needs loss.relation.projection=true")
        self.student_request = layer_request(attention=[(site, i) for site, (i, _) in self.layers.items()])
        self.teacher_request = layer_request(attention=[(site, j) for site, (_, j) in self.layers.items()])

    def project(self, features: Features, projections: nn.ModuleDict) -> None:
        for site, (layer, _) in self.layers.items():
            for kind in self.cfg.relation.kinds:
                name = f"rel_{site}_{kind}"
                if name in projections:
                    x = concat_heads(getattr(features.attention[(site, layer)], QKV[kind]))
                    features.projected[name] = projections[name](x)

    def __call__(self, batch: dict[str, Tensor], student: Output, teacher: Optional[Output]) -> dict[str, Tensor]:
        return {f"rel/{site}": sum(self._relation(student.features, teacher.features, site, kind,
                                                  stack_index(batch, SITE_STACK[site]))
                                   for kind in self.cfg.relation.kinds)
                for site in self.layers}

    def _relation(self, s: Features, t: Features, site: str, kind: str, index: Tensor) -> Tensor:
        r, (i, j) = self.cfg.relation, self.layers[site]
        a_s, a_t = s.attention[(site, i)], t.attention[(site, j)]
        x_t = concat_heads(getattr(a_t, QKV[kind]))
        if r.metric == "mse":  # DirectMiniLM: the (projected) student Q/K/V against the teacher's
            x_s = s.projected.get(f"rel_{site}_{kind}")
            x_s = concat_heads(getattr(a_s, QKV[kind])) if x_s is None else x_s
            return hidden_distance(x_s, x_t, index, "mse")
        x_s, keep = concat_heads(getattr(a_s, QKV[kind])), common_keep(a_s.keep, a_t.keep)
        return map_kl(lambda ins, sl: relation_log_probs(ins[0], r.heads, keep, rows=sl),
                      lambda sl: relation_log_probs(x_t, r.heads, keep, rows=sl), (x_s,), index, x_s.shape[1])
