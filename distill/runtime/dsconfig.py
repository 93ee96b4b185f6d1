"""DeepSpeed configs: read the JSON files in ds_configs/, fill "auto" from the run config, refuse bad ones.

The run config owns every training setting; a DeepSpeed file either says "auto" or agrees with it,
the way the Hugging Face trainer treats its DeepSpeed files.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from distill.config.settings import RunConfig
from distill.errors import DistillError

AUTO = "auto"


def read_ds_config(path: str | Path, role: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"{role}.ds_config not found: {p}")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise DistillError(f"{role}.ds_config {p} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise DistillError(f"{role}.ds_config {p} must hold a JSON object")
    return cfg


def _fill(node: dict[str, Any], key: str, value: Any, where: str, source: str) -> None:
    """Put ``value`` where the file says "auto"; a different explicit value is a conflict."""
    if key not in node:
        node[key] = value
    elif node[key] == AUTO:
        node[key] = value
    elif node[key] != value and not (isinstance(value, float) and _close(node[key], value)):
        raise DistillError(f"{where}: {key} is {node[key]!r} but {source} gives {value!r}; "
                           f"write \"auto\" or make them equal")


def _close(a: Any, b: float) -> bool:
    return isinstance(a, (int, float)) and abs(a - b) <= 1e-12 * max(1.0, abs(b))


def resolve_ds_config(raw: dict[str, Any], cfg: RunConfig, role: str, world_size: int, hidden_size: int,
                      accelerator: str, where: str) -> dict[str, Any]:
    """Return a complete DeepSpeed config for ``role`` ("teacher" or "student")."""
    ds = copy.deepcopy(raw)
    t = cfg.training
    if "scheduler" in ds:
        raise DistillError(f"{where}: remove the \"scheduler\" section; the learning-rate schedule is "
                           f"set by training.lr_schedule and training.warmup_steps")
    if "load_universal" in (ds.get("checkpoint") or {}):
        raise DistillError(f"{where}: remove checkpoint.load_universal; a resume on another number of ranks "
                           "sets it")
    zero = ds.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise DistillError(f"{where}: zero_optimization must be an object")
    stage = zero.get("stage", 0)
    dotted = [k for k in list(ds) + list(zero) if "." in k]
    if dotted:
        # deepspeed.initialize silently ignores dotted keys; nest them instead.
        raise DistillError(f"{where}: dotted key '{dotted[0]}' is ignored by DeepSpeed; nest it as an object")

    if role == "teacher":
        if stage != 3:
            raise DistillError(f"{where}: the teacher must use ZeRO stage 3 (got stage {stage}); "
                               f"no rank may hold a full teacher")
        if "optimizer" in ds:
            raise DistillError(f"{where}: a frozen teacher takes no \"optimizer\" section")
    elif stage not in (0, 1, 2, 3):
        raise DistillError(f"{where}: zero_optimization.stage must be 0-3, got {stage!r}")

    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, where, "training.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", t.gradient_accumulation_steps, where,
          "training.gradient_accumulation_steps")
    _fill(ds, "train_batch_size", t.micro_batch_size * t.gradient_accumulation_steps * world_size, where,
          "training.micro_batch_size * training.gradient_accumulation_steps * world size")
    if role == "student":
        _fill(ds, "gradient_clipping", float(t.max_grad_norm), where, "training.max_grad_norm")
    for section, enabled in (("bf16", t.precision == "bf16"), ("fp16", t.precision == "fp16")):
        node = ds.setdefault(section, {})
        _fill(node, "enabled", enabled, f"{where} {section}", "training.precision")

    # Bucket sizes scale with the model width (the Hugging Face trainer's rule), but never below
    # DeepSpeed's own prefetch default: tiny buckets turn every layer into many small collectives.
    h2 = hidden_size * hidden_size
    floor = 50_000_000
    for key, value in (("reduce_bucket_size", max(h2, floor)), ("stage3_prefetch_bucket_size", max(int(0.9 * h2), floor)),
                       ("stage3_param_persistence_threshold", 10 * hidden_size)):
        if zero.get(key) == AUTO:
            zero[key] = value

    opt = ds.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        _fill(params, "lr", float(t.learning_rate), f"{where} optimizer.params", "training.learning_rate")
        _fill(params, "weight_decay", float(t.weight_decay), f"{where} optimizer.params", "training.weight_decay")
        if params.get("betas") == AUTO:
            params["betas"] = [0.9, 0.999]
        if params.get("eps") == AUTO:
            params["eps"] = 1e-8
        if params.get("torch_adam") == AUTO:
            # Fused and CPU Adam are CUDA/JIT builds; plain torch AdamW is what a CPU run can use.
            params["torch_adam"] = accelerator == "cpu"
    elif role == "student":
        raise DistillError(f"{where}: the student config needs an \"optimizer\" section")

    leftover = _find_auto(ds)
    if leftover:
        raise DistillError(f"{where}: no run-config value fills \"auto\" at {leftover}")
    _check_zero_section(zero, where)
    return ds


def _find_auto(node: Any, path: str = "") -> str | None:
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{path}.{key}" if path else key)
            if found:
                return found
    elif node == AUTO:
        return path
    return None


def _check_zero_section(zero: dict[str, Any], where: str) -> None:
    """Validate zero_optimization with DeepSpeed's own schema now, not after the models are loaded."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**zero)
    except Exception as exc:  # pydantic's ValidationError, with many lines: keep the first useful one
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = "; ".join(lines[1:3]) if len(lines) > 1 else str(exc)
        raise DistillError(f"{where}: invalid zero_optimization: {detail}") from None


def with_universal_load(ds: dict[str, Any]) -> dict[str, Any]:
    """``ds`` set to load a universal checkpoint (nested: deepspeed.initialize ignores dotted keys)."""
    return {**ds, "checkpoint": {**(ds.get("checkpoint") or {}), "load_universal": True}}
