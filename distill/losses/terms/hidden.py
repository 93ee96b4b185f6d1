"""Hidden-state matching over layer maps (Shleifer & Rush 2020, "Pre-trained Summarization Distillation";
Udagawa et al. 2023, "A Comparative Analysis of Task-Agnostic Distillation Methods for Compressing
Transformer Language Models")."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from distill.errors import DistillError
from distill.losses.features import hidden_distance
from distill.losses.terms.base import (STACK_COUNT, Output, Term, layer_request, register, stack_depths_of,
                                       stack_index)
from distill.models.capture import Features
from distill.models.layer_maps import hidden_pairs
from distill.models.loading import hidden_size


@register
class HiddenStates(Term):
    """``hid``: for each stack of ``loss.hidden.stacks``, part ``hid/<stack>`` = a mean over the stack's
    tokens (encoder: source tokens; decoder: target tokens) of the distance summed over the matched
    (student, teacher) hidden-state pairs of ``loss.hidden.map``; per token and pair, ``mse`` is the
    mean over the width of (s − t)², ``cosine`` is 1 − cos(s, t). Widths that differ need
    ``loss.hidden.projection``: a linear map ``hidden_<stack>`` of the student's states."""

    name = "hid"

    def __init__(self, cfg, total_steps, student_config, teacher_config):
        super().__init__(cfg, total_steps, student_config, teacher_config)
        h = cfg.hidden
        d_s, d_t = hidden_size(student_config), hidden_size(teacher_config)
        copied = getattr(student_config, "distill_layer_map", None) or {}
        self.pairs: dict[str, list[tuple[int, int]]] = {}  # stack -> (student, teacher) hidden indices
        for stack in h.stacks:
            n_s, n_t = stack_depths_of(student_config, teacher_config, stack, f"loss.hidden.stacks '{stack}'")
            self.pairs[stack] = hidden_pairs(h.map, n_s, n_t, copied.get(stack), h.teacher_layers)
            if h.projection:
                self.projection_shapes[f"hidden_{stack}"] = (d_s, d_t)
            elif d_s != d_t:
                raise DistillError(f"the student's hidden size ({d_s}) differs from the teacher's ({d_t}): "
                                   "a hidden-state loss needs loss.hidden.projection=true")
            self.parts[f"hid/{stack}"] = STACK_COUNT[stack]
        self.student_request = layer_request([(stack, i) for stack, p in self.pairs.items() for i, _ in p])
        self.teacher_request = layer_request([(stack, j) for stack, p in self.pairs.items() for _, j in p])

    def project(self, features: Features, projections: nn.ModuleDict) -> None:
        for (stack, index), h in list(features.hidden.items()):
            if f"hidden_{stack}" in projections:
                features.hidden[(stack, index)] = projections[f"hidden_{stack}"](h)

    def __call__(self, batch: dict[str, Tensor], student: Output, teacher: Optional[Output]) -> dict[str, Tensor]:
        h, s, t = self.cfg.hidden, student.features, teacher.features
        return {f"hid/{stack}": sum(hidden_distance(s.hidden[(stack, i)], t.hidden[(stack, j)],
                                                    stack_index(batch, stack), h.metric, h.normalize)
                                    for i, j in pairs)
                for stack, pairs in self.pairs.items()}
