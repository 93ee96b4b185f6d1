"""``distill make-student``: shrink a teacher by layer copy, or make a narrower random-init student."""

from __future__ import annotations

import copy
import os
from typing import Any

from distill.dtypes import torch_dtype
from distill.errors import DistillError, first_line
from distill.models.architectures import ArchSpec, arch_spec, layer_stacks, model_kind, stack_depths
from distill.models.layer_maps import layers_to_copy
from distill.paths import is_local_path


def _positive(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DistillError(f"{name} must be a positive integer, got {value!r}")


def _load_teacher(teacher_path: str):
    from transformers import AutoConfig

    from distill.models.loading import auto_class

    if is_local_path(teacher_path) and not os.path.exists(os.path.expanduser(teacher_path)):
        raise DistillError(f"teacher not found: {teacher_path}")
    try:
        config = AutoConfig.from_pretrained(teacher_path)
    except (OSError, ValueError) as exc:
        if not os.path.exists(teacher_path):
            raise DistillError(f"teacher not found: {teacher_path}") from None
        raise DistillError(f"cannot read the teacher config at {teacher_path}: {first_line(exc)}") from None
    auto = auto_class(config)
    try:
        model = auto.from_pretrained(teacher_path, config=config, dtype="auto")
    except (OSError, ValueError) as exc:
        raise DistillError(f"cannot load the teacher model at {teacher_path}: {first_line(exc)}") from None
    return config, model, auto


def _target_depths(spec: ArchSpec, config: Any, encoder_layers, decoder_layers) -> dict[str, int]:
    requested = {"encoder": encoder_layers, "decoder": decoder_layers}
    teacher = stack_depths(config)
    for name, other in (("encoder", "decoder"), ("decoder", "encoder")):
        if requested[name] is not None and name not in spec.stacks:
            raise DistillError(f"{getattr(config, 'model_type', 'this model')} is {model_kind(config)}: "
                               f"{name}_layers does not apply (use {other}_layers)")
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
    ``dtype`` (a torch dtype, float32/float16/bfloat16 or fp32/fp16/bf16) defaults to the teacher's.

    Returns {"out_dir", "teacher", "mode" ("layer_copy"|"width"), "init", "layer_map",
    "depths", "teacher_depths", "teacher_params", "student_params", "copied_tensors", "width"}.
    The student's config records ``distill_layer_map`` (None for width students) and
    ``distill_teacher``."""
    import torch

    teacher_path = os.fspath(teacher_path)
    out_dir = os.fspath(out_dir)
    for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("ffn_size", ffn_size)):
        _positive(name, value)
    dtype = dtype if dtype is None or isinstance(dtype, torch.dtype) else torch_dtype(dtype)
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

    target_dtype = dtype or next(teacher.parameters()).dtype
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
