"""Student construction: which teacher layers to keep, where a model keeps its layers, and
``make_student`` to write a ready-to-train student directory.

Two ways to build a student (methods.md sections 1 and 2):

* shrink by layer copy (Shleifer & Rush): the teacher's config with fewer encoder and/or decoder
  layers; every weight that exists in both models is copied, student layer ``i`` taking teacher
  layer ``layers_to_copy(n_student, n_teacher)[i]``;
* new width (MiniEnD): the teacher's config (vocabulary, special tokens, tokenizer) at a smaller
  hidden size, randomly initialised; nothing is copied.

Architecture knowledge is one small table of attribute names per family (``_FAMILIES``); everything
else (state-dict name mapping, hooks, per-layer config lists) is derived from it.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

from distill.errors import DistillError, first_line
from distill.layer_maps import layers_to_copy, layers_to_supervise  # noqa: F401  (re-exported)

__all__ = [
    "ArchSpec",
    "arch_spec",
    "format_layer_map",
    "attention_dims",
    "find_module",
    "layer_stacks",
    "layers_to_copy",
    "layers_to_supervise",
    "make_student",
    "stack_depths",
]

# --------------------------------------------------------------------------------------------
# 2. Architecture introspection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """Attribute names of one model family.

    ``stacks``: stack name ("encoder"/"decoder") -> (module path in the *ForConditionalGeneration /
    *ForCausalLM model, config attribute holding that stack's depth).
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
}

_MODEL_TYPES: dict[str, str] = {
    **dict.fromkeys(
        ["bart", "mbart", "pegasus", "marian", "plbart", "blenderbot", "blenderbot-small"], "bart"
    ),
    **dict.fromkeys(["t5", "mt5", "umt5"], "t5"),
    **dict.fromkeys(["llama", "qwen2", "qwen3", "mistral"], "llama"),
    "gpt2": "gpt2",
}


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
                "expected a BART/T5-style encoder-decoder or a LLaMA/GPT-2-style decoder"
            )
    return _FAMILIES[family]


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


def attention_dims(config: Any, stack: str) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of the attention in ``stack``, from the config."""
    spec = arch_spec(config)
    names = list(spec.stacks)
    heads = int(getattr(config, spec.heads[names.index(stack)] if len(spec.heads) > 1 else spec.heads[0]))
    kv_heads = int(getattr(config, spec.kv_heads, None) or heads) if spec.kv_heads else heads
    head_dim = getattr(config, spec.head_dim, None) if spec.head_dim else None
    return heads, kv_heads, int(head_dim or getattr(config, spec.hidden) // heads)


# --------------------------------------------------------------------------------------------
# 3. make_student
# --------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def _parse_dtype(dtype: Any):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower().replace("torch.", ""))
    if name is None:
        raise DistillError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16")
    return getattr(torch, name)


def _positive(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DistillError(f"{name} must be a positive integer, got {value!r}")


def _load_teacher(teacher_path: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    looks_local = teacher_path.startswith((".", "~", os.sep)) or teacher_path.count("/") > 1
    if looks_local and not os.path.exists(os.path.expanduser(teacher_path)):
        raise DistillError(f"teacher not found: {teacher_path}")
    try:
        config = AutoConfig.from_pretrained(teacher_path)
    except (OSError, ValueError) as exc:
        if not os.path.exists(teacher_path):
            raise DistillError(f"teacher not found: {teacher_path}") from None
        raise DistillError(f"cannot read the teacher config at {teacher_path}: {first_line(exc)}") from None
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(teacher_path, config=config, dtype="auto")
    except (OSError, ValueError) as exc:
        raise DistillError(f"cannot load the teacher model at {teacher_path}: {first_line(exc)}") from None
    return config, model, auto


def _target_depths(spec: ArchSpec, config: Any, encoder_layers, decoder_layers) -> dict[str, int]:
    requested = {"encoder": encoder_layers, "decoder": decoder_layers}
    teacher = stack_depths(config)
    if encoder_layers is not None and "encoder" not in spec.stacks:
        raise DistillError(
            f"{getattr(config, 'model_type', 'this model')} is decoder-only: "
            "encoder_layers does not apply (use decoder_layers)"
        )
    out = {}
    for name, n_teacher in teacher.items():
        n = requested[name]
        if n is None:
            out[name] = n_teacher
            continue
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DistillError(f"{name}_layers must be a positive integer, got {n!r}")
        if n > n_teacher:
            raise DistillError(
                f"{name}_layers={n} is more than the teacher's {n_teacher} {name} layers"
            )
        out[name] = n
    return out


def _set_depths(spec: ArchSpec, config: Any, teacher_config: Any, depths: dict[str, int]) -> None:
    """Write the new depths into ``config``, slicing per-layer lists along the layer map."""
    teacher_depths = stack_depths(teacher_config)
    for name, (_, attr) in spec.stacks.items():
        setattr(config, attr, depths[name])
    for list_attr, stack in spec.per_layer.items():
        values = getattr(teacher_config, list_attr, None)
        if isinstance(values, (list, tuple)) and len(values) == teacher_depths[stack]:
            keep = layers_to_copy(depths[stack], teacher_depths[stack])
            setattr(config, list_attr, [values[j] for j in keep])


def _set_width(spec: ArchSpec, config: Any, hidden_size, num_heads, ffn_size) -> dict[str, Any]:
    """Write a new width into ``config`` (MiniEnD-style student); returns what was set."""
    teacher_hidden = int(getattr(config, spec.hidden))
    hidden = hidden_size if hidden_size is not None else teacher_hidden
    changes: dict[str, Any] = {spec.hidden: hidden}
    for attr in spec.heads:
        heads = num_heads if num_heads is not None else int(getattr(config, attr))
        if hidden % heads:
            raise DistillError(
                f"hidden size {hidden} is not divisible by {heads} attention heads ({attr})"
            )
        changes[attr] = heads
    heads = changes[spec.heads[0]]
    if spec.kv_heads is not None:
        t_heads = int(getattr(config, spec.heads[0]))
        t_kv = getattr(config, spec.kv_heads, None) or t_heads
        group = max(1, t_heads // int(t_kv))  # keep the teacher's query heads per key/value head
        kv = heads // group if heads % group == 0 and heads >= group else heads
        changes[spec.kv_heads] = kv
    if spec.head_dim is not None:
        changes[spec.head_dim] = hidden // heads
    for attr in spec.ffn:
        t_ffn = getattr(config, attr, None)
        if ffn_size is not None:
            changes[attr] = ffn_size
        elif t_ffn is not None:  # keep the teacher's ffn/hidden ratio
            changes[attr] = max(1, int(t_ffn) * hidden // teacher_hidden)
    for attr, value in changes.items():
        setattr(config, attr, value)
    return changes


def _copy_weights(teacher, student, layer_map: dict[str, list[int]]) -> int:
    """Copy every student tensor from the teacher, layer i of each stack from layer_map[stack][i].
    Returns the number of state-dict entries copied."""
    import torch

    prefixes = {name: prefix + "." for name, (prefix, _) in layer_stacks(student).items()}
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    plan, problems = [], []
    for key, s_tensor in s_state.items():
        t_key = key
        for stack, prefix in prefixes.items():
            if key.startswith(prefix):
                idx, rest = key[len(prefix):].split(".", 1)
                t_key = f"{prefix}{layer_map[stack][int(idx)]}.{rest}"
                break
        t_tensor = t_state.get(t_key)
        if t_tensor is None:
            problems.append(f"{key} (no {t_key} in the teacher)")
        elif t_tensor.shape != s_tensor.shape:
            problems.append(f"{key} (shape {tuple(s_tensor.shape)} vs teacher {tuple(t_tensor.shape)})")
        else:
            plan.append((s_tensor, t_tensor))
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise DistillError(f"cannot copy the teacher's weights into the student: {shown}")
    with torch.no_grad():
        for s_tensor, t_tensor in plan:
            s_tensor.copy_(t_tensor)
    return len(plan)


def _has_tokenizer(path: str) -> bool:
    names = (
        "tokenizer_config.json", "tokenizer.json", "vocab.json", "vocab.txt",
        "spiece.model", "sentencepiece.bpe.model", "source.spm",
    )
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, n)) for n in names)


def make_student(
    teacher_path: str,
    out_dir: str,
    encoder_layers: int | None = None,
    decoder_layers: int | None = None,
    hidden_size: int | None = None,
    num_heads: int | None = None,
    ffn_size: int | None = None,
    dtype: Any = None,
    seed: int = 0,
) -> dict:
    """Build a student from the teacher at ``teacher_path`` and save it as a HF directory.

    Without width options: shrink by layer copy (``None`` depth keeps the teacher's). With any of
    ``hidden_size``/``num_heads``/``ffn_size``: a randomly initialised student at that width
    (seeded by ``seed``) with the teacher's vocabulary and tokenizer; nothing is copied.
    ``dtype`` (float32/float16/bfloat16) defaults to the teacher's.

    Returns {"out_dir", "teacher", "mode" ("layer_copy"|"width"), "init", "layer_map",
    "depths", "teacher_depths", "teacher_params", "student_params", "copied_tensors", "width"}.
    The student's config records ``distill_layer_map`` (None for width students) and
    ``distill_teacher``."""
    import torch

    teacher_path = os.fspath(teacher_path)
    out_dir = os.fspath(out_dir)
    for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("ffn_size", ffn_size)):
        _positive(name, value)
    torch_dtype = _parse_dtype(dtype)
    if os.path.exists(teacher_path) and os.path.exists(out_dir) and os.path.samefile(teacher_path, out_dir):
        raise DistillError(f"the student directory must differ from the teacher's: {out_dir}")

    t_config, teacher, auto = _load_teacher(teacher_path)
    spec = arch_spec(t_config)
    depths = _target_depths(spec, t_config, encoder_layers, decoder_layers)
    t_depths = stack_depths(t_config)
    width_mode = any(v is not None for v in (hidden_size, num_heads, ffn_size))

    s_config = copy.deepcopy(t_config)
    _set_depths(spec, s_config, t_config, depths)
    width = _set_width(spec, s_config, hidden_size, num_heads, ffn_size) if width_mode else None

    if width_mode:
        layer_map = None
    else:
        layer_map = {name: layers_to_copy(depths[name], t_depths[name]) for name in spec.stacks}
        for name, keep in layer_map.items():
            # T5 keeps its relative-position bias only in block 0; every stack starts from layer 0.
            if keep[0] != 0:
                raise DistillError(f"internal error: {name} layer map {keep} does not keep layer 0")
    s_config.distill_layer_map = layer_map
    s_config.distill_teacher = os.path.abspath(teacher_path) if os.path.exists(teacher_path) else teacher_path

    # Validate the edited config the way loading it back would.
    try:
        s_config = type(s_config).from_dict(s_config.to_dict())
    except (TypeError, ValueError) as exc:
        raise DistillError(f"the student config is not valid: {first_line(exc)}") from None

    target_dtype = torch_dtype or next(teacher.parameters()).dtype
    if width_mode:
        torch.manual_seed(seed)
    student = auto.from_config(s_config)
    copied = 0 if width_mode else _copy_weights(teacher, student, layer_map)
    if not width_mode and getattr(t_config, "tie_word_embeddings", False):
        student.tie_weights()
    student = student.to(target_dtype)

    if os.path.isdir(teacher_path) and os.path.exists(os.path.join(teacher_path, "generation_config.json")):
        student.generation_config = copy.deepcopy(teacher.generation_config)

    os.makedirs(out_dir, exist_ok=True)
    student.save_pretrained(out_dir)
    if _has_tokenizer(teacher_path):
        from transformers import AutoTokenizer

        try:
            AutoTokenizer.from_pretrained(teacher_path).save_pretrained(out_dir)
        except (OSError, ValueError) as exc:
            raise DistillError(
                f"cannot copy the teacher's tokenizer from {teacher_path}: {first_line(exc)}"
            ) from None

    return {
        "out_dir": out_dir,
        "teacher": s_config.distill_teacher,
        "family": spec.family,
        "mode": "width" if width_mode else "layer_copy",
        "init": (
            "random init at the new width; nothing copied from the teacher"
            if width_mode
            else "copied from the teacher (embeddings, final norms, LM head, kept layers)"
        ),
        "layer_map": layer_map,
        "depths": depths,
        "teacher_depths": t_depths,
        "width": width,
        "copied_tensors": copied,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "dtype": str(target_dtype).replace("torch.", ""),
    }


def format_layer_map(info: dict) -> str:
    """Human-readable summary of a ``make_student`` result, one line per student layer, e.g.
    ``decoder layer 1 <- teacher layer 6``."""
    lines = []
    layer_map = info.get("layer_map")
    if layer_map:
        for stack, keep in layer_map.items():
            lines += [f"{stack} layer {i} <- teacher layer {j}" for i, j in enumerate(keep)]
    else:
        width = info.get("width") or {}
        hidden = next(iter(width.values()), "?")
        for stack, n in (info.get("depths") or {}).items():
            lines.append(
                f"{stack}: {n} layers, random init at hidden size {hidden} (nothing copied from the teacher)"
            )
    t, s = info.get("teacher_params"), info.get("student_params")
    if t and s:
        lines.append(f"params: student {s:,} / teacher {t:,} ({s / t:.1%})")
    return "\n".join(lines)
