"""The interpolated distillation objective (methods.md section 4):

    L = w_ce·CE(gold) + w_kd·τ²·D(teacher ‖ student) + w_hid·L_hid + w_attn·L_attn + w_rel·L_rel

Each weight follows its schedule over optimizer steps. ``Objective`` is built from the loss settings
and the two models' configs alone, so every layer map, head count and width is checked before a
model loads; it then tells each model what to capture (``requests``), owns the student's learned
projections, and turns captured features into loss terms with the pure functions of ``losses``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from distill.models.capture import Features, Request, check_capturable
from distill.config.settings import WEIGHTS, LossConfig
from distill.data.collate import IGNORE_INDEX
from distill.errors import DistillError
from distill.models.layer_maps import hidden_pairs, resolve_layer
from distill.losses.divergences import TaidLambda, cross_entropy, logit_divergence
from distill.losses.features import attention_log_probs, concat_heads, hidden_distance, map_kl, relation_log_probs, row_slice
from distill.models.loading import hidden_size
from distill.losses.schedules import schedule_value
from distill.models.architectures import attention_dims, stack_depths

TERM = {"w_ce": "ce", "w_kd": "kd", "w_hid": "hid", "w_attn": "attn", "w_rel": "rel"}
SITE_STACK = {"encoder_self": "encoder", "decoder_self": "decoder", "decoder_cross": "decoder"}
QKV = {"q": "query", "k": "key", "v": "value"}


@dataclass
class Output:
    """What one forward pass gives the objective."""

    logits: Tensor
    features: Optional[Features] = None


class Objective:
    def __init__(self, cfg: LossConfig, total_steps: int, student_config: Any, teacher_config: Any = None,
                 partitioned_student: bool = False):
        self.cfg = cfg
        self.partitioned_student = partitioned_student
        self.total_steps = total_steps
        self.step = 0
        self.active = [TERM[w] for w in WEIGHTS if cfg.active(w) and (w == "w_ce" or teacher_config is not None)]
        self.needs_teacher = any(term != "ce" for term in self.active)
        self.taid = (TaidLambda(cfg.taid_lambda_start, cfg.taid_lambda_end, total_steps, cfg.taid_schedule)
                     if "kd" in self.active and cfg.divergence == "taid" else None)
        self.hidden: dict[str, list[tuple[int, int]]] = {}  # stack -> (student, teacher) hidden indices
        self.attention: list[tuple[str, int, int]] = []  # (site, student layer, teacher layer)
        self.relation: list[tuple[str, int, int]] = []
        self.projection_shapes: dict[str, tuple[int, int]] = {}  # name -> (student width, teacher width)
        if self.needs_teacher:
            self._plan(student_config, teacher_config)
            self.student_request, self.teacher_request = self._requests()
            check_capturable(student_config, self.student_request, "student")
            check_capturable(teacher_config, self.teacher_request, "teacher")
        else:
            self.student_request = self.teacher_request = Request()

    # ---- planning (configs only) ---------------------------------------------------------------

    def _plan(self, s_config: Any, t_config: Any) -> None:
        cfg = self.cfg
        s_depths, t_depths = stack_depths(s_config), stack_depths(t_config)
        d_s, d_t = hidden_size(s_config), hidden_size(t_config)

        def depth(stack: str, what: str) -> tuple[int, int]:
            for role, depths in (("student", s_depths), ("teacher", t_depths)):
                if stack not in depths:
                    raise DistillError(f"{what} needs a {stack}, and the {role} has none")
            return s_depths[stack], t_depths[stack]

        if "hid" in self.active:
            h = cfg.hidden
            copied = getattr(s_config, "distill_layer_map", None) or {}
            for stack in h.stacks:
                n_s, n_t = depth(stack, f"loss.hidden.stacks '{stack}'")
                self.hidden[stack] = hidden_pairs(h.map, n_s, n_t, copied.get(stack), h.teacher_layers)
                if h.projection:
                    self.projection_shapes[f"hidden_{stack}"] = (d_s, d_t)
                elif d_s != d_t:
                    raise DistillError(f"the student's hidden size ({d_s}) differs from the teacher's ({d_t}): "
                                       "a hidden-state loss needs loss.hidden.projection=true")
        if "attn" in self.active:
            a = cfg.attention
            for site in a.sites:
                n_s, n_t = depth(SITE_STACK[site], f"loss.attention.sites '{site}'")
                s_heads, t_heads = attention_dims(s_config, SITE_STACK[site])[0], attention_dims(t_config, SITE_STACK[site])[0]
                if s_heads != t_heads:
                    raise DistillError(f"loss.attention compares {site} attention head by head, but the student has "
                                       f"{s_heads} heads and the teacher {t_heads}; loss.relation (MiniLMv2) works "
                                       "across head counts")
                self.attention.append((site, resolve_layer(a.student_layer, n_s, "loss.attention.student_layer"),
                                       resolve_layer(a.teacher_layer, n_t, "loss.attention.teacher_layer")))
        if "rel" in self.active:
            r = cfg.relation
            for site in r.sites:
                stack = SITE_STACK[site]
                n_s, n_t = depth(stack, f"loss.relation.sites '{site}'")
                self.relation.append((site, resolve_layer(r.student_layer, n_s, "loss.relation.student_layer"),
                                      resolve_layer(r.teacher_layer, n_t, "loss.relation.teacher_layer")))
                for kind in r.kinds:
                    widths = [_qkv_width(c, stack, kind) for c in (s_config, t_config)]
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
        if cfg.teacher_uses_student_encoder:
            if not (s_config.is_encoder_decoder and t_config.is_encoder_decoder) or d_s != d_t:
                raise DistillError("loss.teacher_uses_student_encoder needs two encoder-decoder models of the same "
                                   f"hidden size (student {d_s}, teacher {d_t})")
            if "encoder" in self.hidden or any(SITE_STACK[s] == "encoder" for s, *_ in self.attention + self.relation):
                raise DistillError("loss.teacher_uses_student_encoder skips the teacher's encoder, so no encoder "
                                   "feature loss can be computed; drop the encoder from the feature terms")

    def _requests(self) -> tuple[Request, Request]:
        hidden: list[dict[str, set[int]]] = [{}, {}]
        attention: list[dict[str, set[int]]] = [{}, {}]
        for stack, pairs in self.hidden.items():
            for role in (0, 1):
                hidden[role].setdefault(stack, set()).update(p[role] for p in pairs)
        for site, s_layer, t_layer in self.attention + self.relation:
            attention[0].setdefault(site, set()).add(s_layer)
            attention[1].setdefault(site, set()).add(t_layer)
        return tuple(Request({k: tuple(sorted(v)) for k, v in hidden[r].items()},  # type: ignore[return-value]
                             {k: tuple(sorted(v)) for k, v in attention[r].items()}) for r in (0, 1))

    @property
    def captures_attention(self) -> bool:
        return bool(self.attention or self.relation)

    # ---- projections (trained with the student, never exported) ---------------------------------

    def build_projections(self, dtype: torch.dtype) -> nn.ModuleDict:
        return nn.ModuleDict({name: nn.Linear(i, o, bias=False, dtype=dtype)
                              for name, (i, o) in self.projection_shapes.items()})

    def project(self, features: Features, projections: nn.ModuleDict) -> Features:
        """Map the student's features to the teacher's widths; runs inside the student's forward."""
        for (stack, index), h in list(features.hidden.items()):
            if f"hidden_{stack}" in projections:
                features.hidden[(stack, index)] = projections[f"hidden_{stack}"](h)
        for site, layer, _ in self.relation:
            for kind in self.cfg.relation.kinds:
                name = f"rel_{site}_{kind}"
                if name in projections:
                    x = concat_heads(getattr(features.attention[(site, layer)], QKV[kind]))
                    features.projected[name] = projections[name](x)
        return features

    # ---- the loss ------------------------------------------------------------------------------

    def weights(self) -> dict[str, float]:
        """Every active term's weight at the current step."""
        out = {}
        for w in WEIGHTS:
            if TERM[w] in self.active:
                start, end = getattr(self.cfg, w), getattr(self.cfg, f"{w}_end")
                out[TERM[w]] = schedule_value(getattr(self.cfg, f"{w}_schedule"), start,
                                              start if end is None else end, self.step, self.total_steps)
        return out

    def schedule_values(self) -> dict[str, float]:
        """Scheduled quantities other than the weights, for logging."""
        return {"taid_lambda": self.taid.value} if self.taid is not None else {}

    def __call__(self, batch: dict[str, Tensor], student: Output, teacher: Optional[Output] = None,
                 gold: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """(weighted total, every term and sub-term); sub-terms are named ``group/part``. ``gold``
        False: the targets are the student's own samples (on-policy), so there is no CE term."""
        cfg, weights = self.cfg, self.weights()
        if not gold:
            weights.pop("ce", None)
        labels = batch["labels"]
        rows = {"encoder": batch["attention_mask"].bool(), "decoder": labels != IGNORE_INDEX}
        terms: dict[str, Tensor] = {}
        if "ce" in weights:
            terms["ce"] = cross_entropy(student.logits, labels, label_smoothing=cfg.label_smoothing)
        if "kd" in weights:
            terms["kd"] = logit_divergence(student.logits, teacher.logits, rows["decoder"],
                                           kind=cfg.divergence, temperature=cfg.temperature, beta=cfg.jsd_beta,
                                           alpha=cfg.skew_alpha, lam=self.taid.value if self.taid else 0.0)
        s, t = (student.features, teacher.features) if teacher is not None else (None, None)
        if self.hidden:
            h = cfg.hidden
            for stack, pairs in self.hidden.items():
                terms[f"hid/{stack}"] = sum(
                    hidden_distance(s.hidden[(stack, i)], t.hidden[(stack, j)], rows[stack], h.metric, h.normalize)
                    for i, j in pairs)
        for site, i, j in self.attention:
            a_s, a_t = s.attention[(site, i)], t.attention[(site, j)]
            (s_maps, s_inputs), (t_maps, t_inputs) = _attention_maps(a_s), _attention_maps(a_t)
            terms[f"attn/{site}"] = map_kl(s_maps, lambda sl: t_maps(t_inputs, sl), s_inputs, rows[SITE_STACK[site]],
                                           a_s.query.shape[2], a_s.query.shape[1])
        for site, i, j in self.relation:
            terms[f"rel/{site}"] = sum(self._relation(s, t, site, i, j, kind, rows[SITE_STACK[site]])
                                       for kind in cfg.relation.kinds)
        for group in ("hid", "attn", "rel"):
            parts = [v for k, v in terms.items() if k.startswith(group + "/")]
            if parts:
                terms[group] = sum(parts)
        total = sum(weights[k] * terms[k] for k in weights)
        if self.partitioned_student and "ce" not in weights and "kd" not in weights:
            # ZeRO-3 gathers a module's weights for the backward when the gradient reaches that module's
            # output. Feature terms alone enter mid-module (Q/K/V inside an attention block), so the
            # blocks around them would miss that step; the logits join the graph with weight 0 so that
            # every module's output takes part in the backward (at the cost of a full backward).
            total = total + 0.0 * student.logits.sum()
        return total, terms

    def _relation(self, s: Features, t: Features, site: str, i: int, j: int, kind: str, rows: Tensor) -> Tensor:
        r = self.cfg.relation
        a_s, a_t = s.attention[(site, i)], t.attention[(site, j)]
        x_t = concat_heads(getattr(a_t, QKV[kind]))
        if r.metric == "mse":  # DirectMiniLM: the (projected) student Q/K/V against the teacher's
            x_s = s.projected.get(f"rel_{site}_{kind}")
            x_s = concat_heads(getattr(a_s, QKV[kind])) if x_s is None else x_s
            return hidden_distance(x_s, x_t, rows, "mse")
        x_s = concat_heads(getattr(a_s, QKV[kind]))
        return map_kl(lambda ins, sl: relation_log_probs(ins[0], r.heads, a_s.keep, rows=sl),
                      lambda sl: relation_log_probs(x_t, r.heads, a_t.keep, rows=sl), (x_s,), rows,
                      x_s.shape[1], r.heads)

    # ---- state across steps --------------------------------------------------------------------

    @property
    def tracks_losses(self) -> bool:
        """Whether ``step_end`` needs each step's losses (adaptive state such as TAID's λ)."""
        return self.taid is not None

    def step_end(self, step: int, terms: Optional[dict[str, float]] = None) -> None:
        """Advance the weight schedules, and TAID's λ with losses already reduced across ranks."""
        self.step = step
        if self.taid is not None:
            self.taid.update(step, terms["kd"])

    def state_dict(self) -> dict:
        state: dict[str, Any] = {"step": self.step}
        if self.taid is not None:
            state["taid"] = self.taid.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state.get("step", 0))
        if self.taid is not None and "taid" in state:
            self.taid.load_state_dict(state["taid"])


def _attention_maps(a) -> tuple[Any, tuple[Tensor, ...]]:
    """(maps(inputs, rows_slice), inputs) of one captured attention call, for ``map_kl``: the
    tensors a gradient may flow to are inputs (T5's learned position bias among them)."""
    inputs = (a.query, a.key) + (() if a.position_bias is None else (a.position_bias,))

    def maps(ins: tuple[Tensor, ...], rows: slice) -> Tensor:
        bias = row_slice(ins[2], rows) if len(ins) > 2 else None
        return attention_log_probs(ins[0][:, :, rows], ins[1], row_slice(a.keep, rows), a.scaling, bias)
    return maps, inputs


def _qkv_width(config: Any, stack: str, kind: str) -> int:
    heads, kv_heads, head_dim = attention_dims(config, stack)
    return (heads if kind == "q" else kv_heads) * head_dim


@torch.no_grad()
def teacher_forced_sums(logits: Tensor, labels: Tensor, row_weight: Tensor) -> Tensor:
    """(summed NLL, token count, correct top-1) over real target tokens, rows weighted."""
    mask = labels != IGNORE_INDEX
    weight = row_weight[:, None].expand_as(labels)[mask].float()
    rows = logits[mask].float()
    target = labels[mask]
    nll = torch.nn.functional.cross_entropy(rows, target, reduction="none")
    correct = (rows.argmax(-1) == target).float()
    return torch.stack([(nll * weight).sum(), weight.sum(), (correct * weight).sum()])
