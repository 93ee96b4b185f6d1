"""Feature capture: what the loss takes from inside a model, and only from the layers it maps.

* Hidden states come from forward hooks on the mapped layers (index 0, the embedding output, from a
  pre-hook on the first layer; the last index from the stack's final norm when it has one), so they
  equal the ``hidden_states`` tuple of ``output_hidden_states=True`` without building it.
* Attention comes from a thin wrapper around transformers' SDPA attention function, registered as
  the attention implementation ``distill_sdpa``. At the mapped attention modules it records the
  queries, keys and values the model actually uses (after rotary embeddings, before any key/value
  head repetition), the mask and the scaling; every module, mapped or not, still runs SDPA. The
  distributions and relations are then computed from those inputs by ``distill.losses.features``, so no
  layer ever materialises attention weights it does not need, unlike ``output_attentions=True``,
  which needs eager attention in every layer.

Hooks record only inside ``Capture.record()``; evaluation and generation pass through untouched.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from distill.errors import DistillError
from distill.models.lm_head import Head, head_of, trunk
from distill.models.loading import model_class
from distill.models.architectures import arch_spec, find_module, layer_stacks

CAPTURE_ATTENTION = "distill_sdpa"
_SINK = "_distill_sink"


@dataclass
class AttentionInputs:
    """One attention call, as the model made it."""

    query: Tensor  # (B, H, Tq, d)
    key: Tensor  # (B, H_kv, Tk, d)
    value: Tensor  # (B, H_kv, Tk, d)
    keep: Optional[Tensor]  # bool, broadcastable to (B, H, Tq, Tk): True where a query may attend a key
    scaling: Optional[float]
    position_bias: Optional[Tensor]  # T5's relative-position bias, added to the scores


@dataclass
class Features:
    hidden: dict[tuple[str, int], Tensor] = field(default_factory=dict)  # (stack, hidden index) -> (B, T, d)
    attention: dict[tuple[str, int], AttentionInputs] = field(default_factory=dict)  # (site, layer) -> inputs
    projected: dict[str, Tensor] = field(default_factory=dict)  # student Q/K/V mapped to the teacher's width


@dataclass
class Output:
    """What one model's forward gives the losses: its final hidden states at the batch's target rows
    (``rows``, flat indices) through ``Head.prepare``, the ``Head`` that turns them into logits, the captured features and the
    encoder's last hidden state (encoder-decoder models)."""

    hidden: Tensor  # (N, d)
    head: Head
    features: Optional[Features] = None
    encoder_hidden: Optional[Tensor] = None


@dataclass(frozen=True)
class Request:
    """What to capture from one model: hidden indices per stack and attention layers per site."""

    hidden: dict[str, tuple[int, ...]] = field(default_factory=dict)
    attention: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any(self.hidden.values()) or any(self.attention.values())


def _keep_mask(module: nn.Module, query: Tensor, key: Tensor, mask: Optional[Tensor], kwargs: dict) -> Optional[Tensor]:
    """The mask SDPA applies, as booleans: the given one, or the causal one SDPA builds itself."""
    if mask is not None:
        return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    q_len, k_len = query.shape[2], key.shape[2]
    if q_len > 1 and is_causal:  # SDPA's causal mask is aligned top-left
        return torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()[None, None]
    return None


def _capturing_sdpa(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    sink = getattr(module, _SINK, None)
    if sink is not None:
        sink(AttentionInputs(query, key, value, _keep_mask(module, query, key, attention_mask, kwargs),
                             kwargs.get("scaling"), kwargs.get("position_bias")))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> None:
    """Make ``distill_sdpa`` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_ATTENTION, _capturing_sdpa)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)


def check_capturable(config: Any, request: Request, role: str) -> None:
    """Refuse, before loading, a request the model cannot serve."""
    spec = arch_spec(config)
    for site, layers in request.attention.items():
        if not layers:
            continue
        if site not in spec.attention:
            raise DistillError(f"the {role} ({config.model_type}) has no {site} attention to capture "
                               f"(it has: {', '.join(spec.attention) or 'none'})")
        cls = model_class(config)
        if cls is not None and not getattr(cls, "_supports_sdpa", False):
            raise DistillError(f"the {role}'s attention modules ({cls.__name__}) cannot be hooked: "
                               "attention capture needs a model that runs transformers' SDPA attention")


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class Capture:
    """Hooks on one model that record the requested features during ``record()``."""

    def __init__(self, model: nn.Module, request: Request, role: str):
        self.role = role
        self.request = request
        self._features: Optional[Features] = None
        self._pending: list[Callable[[], Any]] = []  # hook registrations, run by ``install``
        spec = arch_spec(model)
        stacks = layer_stacks(model)
        for stack, indices in request.hidden.items():
            layers = stacks[stack][1]
            norm = find_module(model, spec.final_norm[stack]) if stack in spec.final_norm else None
            for index in indices:
                self._hook_hidden(stack, index, layers, norm)
        for site, layer_ids in request.attention.items():
            stack, path = spec.attention[site]
            for layer in layer_ids:
                found = find_module(stacks[stack][1][layer], path)
                if found is None:
                    raise DistillError(f"cannot find the {site} attention of the {role}'s layer {layer} (looked for {path})")
                setattr(found[1], _SINK, self._sink((site, layer)))
        if request.attention and getattr(model.config, "_attn_implementation", None) != CAPTURE_ATTENTION:
            raise DistillError(f"the {role} must be loaded with attn_implementation={CAPTURE_ATTENTION!r} "
                               "to capture attention")

    def _hook_hidden(self, stack: str, index: int, layers: nn.ModuleList, norm) -> None:
        key = (stack, index)
        if index == 0:  # the embedding output is the first layer's input
            def pre_hook(module, args, kwargs):
                if self._features is not None:
                    self._features.hidden[key] = args[0] if args else kwargs["hidden_states"]
            self._pending.append(lambda: layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
            return
        module = norm[1] if index == len(layers) and norm is not None else layers[index - 1]

        def hook(module, args, output):
            if self._features is not None:
                self._features.hidden[key] = _first(output)
        self._pending.append(lambda: module.register_forward_hook(hook))

    def install(self) -> None:
        """Register the hooks. Called at the first capturing forward, after DeepSpeed has added its
        own: forward hooks run in registration order, and ZeRO-3's wraps each module output so that
        the backward pass re-gathers that module's weights. A hook that ran before it would hand the
        loss an unwrapped tensor, and the backward through it would meet an empty partition."""
        for register in self._pending:
            register()
        self._pending = []

    def _sink(self, key: tuple[str, int]) -> Callable[[AttentionInputs], None]:
        def sink(inputs: AttentionInputs) -> None:
            if self._features is not None:
                self._features.attention[key] = inputs
        return sink

    @contextmanager
    def record(self) -> Iterator[Features]:
        self._features = features = Features()
        try:
            yield features
        finally:
            self._features = None
        missing = [f"{site} layer {layer}" for site, layers in self.request.attention.items() for layer in layers
                   if (site, layer) not in features.attention]
        missing += [f"{stack} hidden state {i}" for stack, idx in self.request.hidden.items() for i in idx
                    if (stack, i) not in features.hidden]
        if missing:
            raise DistillError(f"the {self.role}'s forward pass did not produce {', '.join(missing)}: its modules "
                               "do not run through the hooked layers or transformers' attention interface")


class FeatureModel(nn.Module):
    """A Hugging Face model as distillation trains it: capture hooks, plus the student's learned
    projections (``projections``), which live here so the student's optimizer trains them and the
    export, which writes ``model`` only, leaves them out.

    ``forward`` runs the model up to its LM head (``lm_head.trunk``): no logits are computed there.
    ``project`` runs inside this forward so that, under ZeRO-3, the projections' weights are gathered
    by the same engine hooks as the model's.
    """

    def __init__(self, model: nn.Module, request: Request = Request(), role: str = "model",
                 projections: Optional[nn.ModuleDict] = None,
                 project: Optional[Callable[[Features, nn.ModuleDict], Features]] = None):
        super().__init__()
        self.model = model
        self.projections = projections if projections is not None else nn.ModuleDict()
        self._capture = Capture(model, request, role) if request else None
        self._project = project
        self.head = head_of(model)

    @property
    def config(self):
        return self.model.config

    def forward(self, rows: Optional[Tensor] = None, features: bool = False, loss: Optional[Callable[[Output], Any]] = None,
                **inputs: Any) -> Any:
        """An ``Output`` at the flat row indices ``rows`` (all rows when None); ``features``: with the
        requested features captured. With ``loss``, ``loss(output)`` instead, run inside this forward:
        the logit terms apply the head there, through the head module's own call (``Head.call``)."""
        captured = None
        if features and self._capture is not None:
            self._capture.install()
            with self._capture.record() as captured:
                hidden, encoded = trunk(self.model, **inputs)
            if self._project is not None:
                captured = self._project(captured, self.projections)
        else:
            hidden, encoded = trunk(self.model, **inputs)
        flat = hidden.reshape(-1, hidden.shape[-1])
        output = Output(self.head.prepare(flat if rows is None else flat.index_select(0, rows)), self.head, captured,
                        encoded)
        return output if loss is None else loss(output)
