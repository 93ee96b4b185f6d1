"""Where each model family keeps its layer stacks, attention modules and widths."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distill.errors import DistillError


@dataclass(frozen=True)
class ArchSpec:
    """Attribute names of one model family.

    ``stacks``: stack name ("encoder"/"decoder") -> (module path in the *ForConditionalGeneration /
    *ForCausalLM / *ForMaskedLM model, config attribute holding that stack's depth). A family with an
    encoder stack alone is encoder-only (a masked LM), one with a decoder stack alone decoder-only.
    ``heads``: config attributes holding attention-head counts; ``ffn``: feed-forward widths.
    """

    family: str
    stacks: dict[str, tuple[str, str]]
    hidden: str
    heads: tuple[str, ...]
    ffn: tuple[str, ...]
    kv_heads: str | None = None
    head_dim: str | None = None
    # Per-layer config lists (length == depth of the named stack) that must follow the layer map.
    per_layer: dict[str, str] = field(default_factory=dict)
    # Attention site -> (stack, module path inside one layer); feature capture hooks these.
    attention: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Stack -> final norm applied after its last layer (some members of a family have none, e.g. BART).
    final_norm: dict[str, str] = field(default_factory=dict)
    # What a masked LM's head does to the final hidden states before its vocabulary matrix, in order:
    # module paths, or an activation name of transformers' ACT2FN (RoBERTa's head calls gelu itself).
    head_transform: tuple[str, ...] = ()


# Encoder-only masked LMs. Their layers are post-LN (BERT, RoBERTa) or end in a final norm (ModernBERT);
# the MLM head's transform (dense, activation, LayerNorm) runs on the rows the loss reads, then the
# vocabulary matrix in the fused head pass.
_BERT_LIKE = dict(hidden="hidden_size", heads=("num_attention_heads",), ffn=("intermediate_size",),
                  attention={"encoder_self": ("encoder", "attention.self")})
_FAMILIES: dict[str, ArchSpec] = {
    "bart": ArchSpec(
        family="bart",
        stacks={
            "encoder": ("model.encoder.layers", "encoder_layers"),
            "decoder": ("model.decoder.layers", "decoder_layers"),
        },
        hidden="d_model",
        heads=("encoder_attention_heads", "decoder_attention_heads"),
        ffn=("encoder_ffn_dim", "decoder_ffn_dim"),
        attention={"encoder_self": ("encoder", "self_attn"), "decoder_self": ("decoder", "self_attn"),
                   "decoder_cross": ("decoder", "encoder_attn")},
        final_norm={"encoder": "model.encoder.layer_norm", "decoder": "model.decoder.layer_norm"},
    ),
    "t5": ArchSpec(
        family="t5",
        stacks={
            "encoder": ("encoder.block", "num_layers"),
            "decoder": ("decoder.block", "num_decoder_layers"),
        },
        hidden="d_model",
        heads=("num_heads",),
        ffn=("d_ff",),
        head_dim="d_kv",
        attention={"encoder_self": ("encoder", "layer.0.SelfAttention"),
                   "decoder_self": ("decoder", "layer.0.SelfAttention"),
                   "decoder_cross": ("decoder", "layer.1.EncDecAttention")},
        final_norm={"encoder": "encoder.final_layer_norm", "decoder": "decoder.final_layer_norm"},
    ),
    "llama": ArchSpec(
        family="llama",
        stacks={"decoder": ("model.layers", "num_hidden_layers")},
        hidden="hidden_size",
        heads=("num_attention_heads",),
        ffn=("intermediate_size",),
        kv_heads="num_key_value_heads",
        head_dim="head_dim",
        per_layer={"layer_types": "decoder"},
        attention={"decoder_self": ("decoder", "self_attn")},
        final_norm={"decoder": "model.norm"},
    ),
    "gpt2": ArchSpec(
        family="gpt2",
        stacks={"decoder": ("transformer.h", "n_layer")},
        hidden="n_embd",
        heads=("n_head",),
        ffn=("n_inner",),
        attention={"decoder_self": ("decoder", "attn")},
        final_norm={"decoder": "transformer.ln_f"},
    ),
    "bert": ArchSpec(family="bert", stacks={"encoder": ("bert.encoder.layer", "num_hidden_layers")},
                     head_transform=("cls.predictions.transform",), **_BERT_LIKE),
    "roberta": ArchSpec(family="roberta", stacks={"encoder": ("roberta.encoder.layer", "num_hidden_layers")},
                        head_transform=("lm_head.dense", "gelu", "lm_head.layer_norm"), **_BERT_LIKE),
    "modernbert": ArchSpec(
        family="modernbert",
        stacks={"encoder": ("model.layers", "num_hidden_layers")},
        hidden="hidden_size",
        heads=("num_attention_heads",),
        ffn=("intermediate_size",),
        per_layer={"layer_types": "encoder"},
        attention={"encoder_self": ("encoder", "attn")},
        final_norm={"encoder": "model.final_norm"},
        head_transform=("head",),
    ),
}

_MODEL_TYPES: dict[str, str] = {
    **dict.fromkeys(
        ["bart", "mbart", "pegasus", "marian", "plbart", "blenderbot", "blenderbot-small"], "bart"
    ),
    **dict.fromkeys(["t5", "mt5", "umt5"], "t5"),
    **dict.fromkeys(["llama", "qwen2", "qwen3", "mistral"], "llama"),
    "gpt2": "gpt2",
    "bert": "bert",
    **dict.fromkeys(["roberta", "xlm-roberta", "camembert"], "roberta"),
    "modernbert": "modernbert",
}

ENCODER_DECODER, DECODER_ONLY, ENCODER_ONLY = "encoder-decoder", "decoder-only", "encoder-only"


def arch_spec(config_or_model: Any) -> ArchSpec:
    """The ``ArchSpec`` of a HF config or model: by ``model_type``, else by the config's
    attribute names (so close relatives of the listed families work too)."""
    config = getattr(_unwrap(config_or_model)[0], "config", config_or_model)
    family = _MODEL_TYPES.get(getattr(config, "model_type", None) or "")
    if family is None:
        has = lambda *names: all(getattr(config, n, None) is not None for n in names)  # noqa: E731
        if getattr(config, "is_encoder_decoder", False) and has("encoder_layers", "decoder_layers"):
            family = "bart"
        elif getattr(config, "is_encoder_decoder", False) and has("num_layers", "d_kv"):
            family = "t5"
        elif has("n_layer", "n_embd"):
            family = "gpt2"
        elif has("num_hidden_layers", "hidden_size", "intermediate_size"):
            family = "llama"
        else:
            raise DistillError(
                f"unsupported architecture {getattr(config, 'model_type', type(config).__name__)!r}: "
                "expected a BART/T5-style encoder-decoder, a LLaMA/GPT-2-style decoder or a BERT/RoBERTa/ModernBERT "
                "encoder"
            )
    return _FAMILIES[family]


def model_kind(config: Any) -> str:
    """ENCODER_DECODER, DECODER_ONLY or ENCODER_ONLY (a masked LM), from a HF config."""
    if getattr(config, "is_encoder_decoder", False):
        return ENCODER_DECODER
    return ENCODER_ONLY if set(arch_spec(config).stacks) == {"encoder"} else DECODER_ONLY


def stack_depths(config_or_model: Any) -> dict[str, int]:
    """Number of layers per stack, read from the config: {"encoder": n, "decoder": m}."""
    config = getattr(_unwrap(config_or_model)[0], "config", config_or_model)
    spec = arch_spec(config)
    return {name: int(getattr(config, attr)) for name, (_, attr) in spec.stacks.items()}


def _unwrap(model: Any) -> tuple[Any, str]:
    """Strip DeepSpeed/DDP-style wrappers (``.module``); returns (inner model, name prefix)."""
    import torch.nn as nn
    from transformers import PreTrainedModel

    prefix = ""
    while (
        isinstance(model, nn.Module)
        and not isinstance(model, PreTrainedModel)
        and isinstance(getattr(model, "module", None), nn.Module)
    ):
        model = model.module
        prefix += "module."
    return model, prefix


def _get_path(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_module(model: Any, path: str) -> tuple[str, Any] | None:
    """(dotted name, module) at ``path`` inside ``model``, also trying the path with leading parts
    dropped (so task-model paths work on bare base models and through DeepSpeed/DDP wrappers)."""
    inner, wrap_prefix = _unwrap(model)
    parts = path.split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        found = _get_path(inner, candidate)
        if found is not None:
            return wrap_prefix + candidate, found
    return None


def layer_stacks(model: Any) -> dict[str, tuple[str, Any]]:
    """The transformer-layer stacks of a HF model: {"encoder": (prefix, ModuleList),
    "decoder": (prefix, ModuleList)}; decoder-only models have "decoder" only.

    ``prefix`` is the dotted name of the ModuleList inside ``model`` (as in ``named_modules`` /
    ``named_parameters``), e.g. "model.decoder.layers"; layer i is ``f"{prefix}.{i}"``.
    Works for the task models (*ForConditionalGeneration / *ForCausalLM), their bare base models
    and DeepSpeed/DDP wrappers around either."""
    import torch.nn as nn

    spec = arch_spec(_unwrap(model)[0])
    stacks: dict[str, tuple[str, Any]] = {}
    for name, (path, _) in spec.stacks.items():
        found = find_module(model, path)
        if found is None or not isinstance(found[1], nn.ModuleList):
            raise DistillError(f"cannot find the {name} layers of {type(_unwrap(model)[0]).__name__} "
                               f"(looked for {path})")
        stacks[name] = found
    return stacks


def layer_kind(config: Any, stack: str, layer: int) -> str:
    """A layer's attention kind ("full_attention", "sliding_attention", ...) from the config's per-layer
    list (``ArchSpec.per_layer``), or "full_attention" where the family has none."""
    spec = arch_spec(config)
    for attr, of in spec.per_layer.items():
        kinds = getattr(config, attr, None)
        if of == stack and isinstance(kinds, (list, tuple)) and len(kinds) > layer:
            return str(kinds[layer])
    return "full_attention"


def attention_dims(config: Any, stack: str) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of the attention in ``stack``, from the config."""
    spec = arch_spec(config)
    names = list(spec.stacks)
    heads = int(getattr(config, spec.heads[names.index(stack)] if len(spec.heads) > 1 else spec.heads[0]))
    kv_heads = int(getattr(config, spec.kv_heads, None) or heads) if spec.kv_heads else heads
    head_dim = getattr(config, spec.head_dim, None) if spec.head_dim else None
    return heads, kv_heads, int(head_dim or getattr(config, spec.hidden) // heads)
