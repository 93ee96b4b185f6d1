"""Export: turn the partitioned student back into a plain Hugging Face directory.

Two ways in, one way out (``write_model_dir``):

* at the end of training, from the live ZeRO-3 engine: parameters are gathered one at a time, so no
  rank needs room for more than one full tensor beyond its own shard;
* offline, from a checkpoint on disk (``distill.train.checkpoint_export``).

The directory is built from a fresh model skeleton on the meta device filled with the consolidated
tensors, re-tied (BART, T5 share embeddings and LM head, which DeepSpeed's own safetensors
conversion cannot write), cast, saved as sharded safetensors, then moved into place only when complete.
Training-only parts (the learned projections) are left out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from distill.errors import DistillError
from distill.files import describe_write_error, replace_dir

MODEL_FILES = "student"  # inside a checkpoint tag: config, generation config, tokenizer, run config


def gathered_state_dict(module: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> Optional[dict]:
    """Every persistent tensor of ``module`` as a full CPU tensor on rank 0 (None on other ranks)."""
    import deepspeed

    rank = dist.get_rank() if dist.is_initialized() else 0
    keys = set(module.state_dict().keys())
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters(remove_duplicate=True):
        if hasattr(param, "ds_id"):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank == 0:
                    out[name] = param.detach().to("cpu", dtype or param.dtype).clone()
        elif rank == 0:
            out[name] = param.detach().to("cpu", dtype or param.dtype).clone()
    if rank != 0:
        return None
    for name, buf in module.named_buffers():
        if name in keys:
            out[name] = buf.detach().cpu().clone()
    return out


def model_card(config, run_config: Optional[dict] = None, results: Optional[dict] = None) -> str:
    """README.md of an exported student: where it came from, the recipe, and its evaluation figures."""
    teacher = getattr(config, "distill_teacher", None)
    layer_map = getattr(config, "distill_layer_map", None)
    lines = ["---", "library_name: transformers", "tags: [distillation, distill]"]
    if teacher:
        lines.append(f"base_model: {teacher}")
    lines += ["---", "", f"# {config.model_type} student distilled with distill", ""]
    if teacher:
        lines.append(f"Teacher: `{teacher}`.")
    if layer_map:
        for stack, layers in layer_map.items():
            lines.append(f"- {stack}: student layers initialised from teacher layers {layers}")
    if results:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()]
    if run_config:
        import yaml

        lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(run_config, sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_model_dir(config, state: dict[str, torch.Tensor], tokenizer, out_dir: Path, dtype: Optional[torch.dtype] = None,
                    card: Optional[str] = None, max_shard_size: str = "5GB", generation_config=None) -> None:
    """Write a Hugging Face directory from a full state dict (keys as in the bare HF model)."""
    model = skeleton(config)
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(state) - tied_keys(model))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise DistillError(f"the weights do not fit a {config.model_type} model of this config: "
                           f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    params = dict(model.named_parameters())
    for name, tensor in state.items():
        if name in params and tuple(params[name].shape) != tuple(tensor.shape):
            raise DistillError(f"weight {name} has shape {tuple(tensor.shape)}, the config expects "
                               f"{tuple(params[name].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    if generation_config is not None:
        model.generation_config = generation_config
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card:
            (tmp / "README.md").write_text(card)
    except (OSError, RuntimeError, SafetensorError) as exc:  # a full disk, a read-only directory: nothing stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise DistillError(f"writing {out_dir} failed: {describe_write_error(exc, tmp)}") from None
    replace_dir(tmp, out_dir)


def skeleton(config):
    """An empty (meta-device) model of ``config``, outside any ZeRO-3 context the run may have on."""
    from distill.models.loading import model_class

    cls = model_class(config)
    if cls is None:
        raise DistillError(f"no generation model class for model type {config.model_type!r}")
    with torch.device("meta"):
        return cls(config)


def tied_keys(model) -> set[str]:
    """State-dict keys that are tied to another parameter (written once, re-tied on load)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        else:
            seen[id(param)] = name
    keys = getattr(model, "_tied_weights_keys", None) or {}
    tied.update(keys if isinstance(keys, (list, set, tuple)) else keys.keys())
    return tied


def export_student(module: torch.nn.Module, tokenizer, out_dir: Path, dtype: Optional[torch.dtype] = None,
                   card: Optional[str] = None) -> None:
    """Write ``out_dir`` from the live (possibly partitioned) model. All ranks must call this (the
    gathers are collective); rank 0 writes."""
    state = gathered_state_dict(module, dtype)
    error = None
    if state is not None:
        try:
            write_model_dir(module.config, state, tokenizer, out_dir, dtype, card,
                            generation_config=getattr(module, "generation_config", None))  # masked LMs have none
        except DistillError as exc:
            error = str(exc)
    if dist.is_initialized():  # every rank learns whether rank 0 failed, so none waits for it
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = errors[0]
    if error is not None:
        raise DistillError(error)


def save_model_files(model, tokenizer, run_config: dict, directory: Path) -> None:
    """What an offline export needs besides the weights, stored inside each checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:  # masked LMs do not generate
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "run_config.json").write_text(json.dumps(run_config, indent=2))
