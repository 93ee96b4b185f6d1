"""Export: turn the partitioned student back into a plain Hugging Face directory.

Two ways in, one way out (``write_model_dir``):

* at the end of training, from the live ZeRO-3 engine: parameters are gathered one at a time, so no
  rank needs room for more than one full tensor beyond its own shard;
* offline, from a checkpoint on disk (``export_checkpoint``), on CPU, whatever world size wrote it,
  through DeepSpeed's own fp32 consolidation of the partitioned optimizer state (ZeRO-1/2/3), or from
  the whole module state that ZeRO-0 saves.

The directory is built from a fresh model skeleton on the meta device filled with the consolidated
tensors, re-tied (BART, T5 share embeddings and LM head, which DeepSpeed's own safetensors
conversion cannot write), cast, saved as sharded safetensors, then moved into place only when complete.
Training-only parts (the learned projections) are left out.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from distill.errors import DistillError, first_line

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


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place; an older one is removed only after the new one is complete."""
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


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
    model = _skeleton(config)
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(state) - _tied_keys(model))
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
        from distill.train.checkpoint import describe_write_error

        raise DistillError(f"writing {out_dir} failed: {describe_write_error(exc, tmp)}") from None
    replace_dir(tmp, out_dir)


def _skeleton(config):
    """An empty (meta-device) model of ``config``, outside any ZeRO-3 context the run may have on."""
    from distill.models.loading import model_class

    cls = model_class(config)
    if cls is None:
        raise DistillError(f"no generation model class for model type {config.model_type!r}")
    with torch.device("meta"):
        return cls(config)


def _tied_keys(model) -> set[str]:
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


# ---- offline export --------------------------------------------------------------------------------

def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoints directory, tag) from a run directory, a checkpoints directory or a tag directory."""
    from distill.train.checkpoint import read_latest

    path = Path(path).expanduser()
    if not path.is_dir():
        raise DistillError(f"checkpoint not found: {path}")
    for root in (path / "checkpoints", path):
        latest = read_latest(root)
        if latest is not None:
            return root, latest
    if any(path.glob("*model_states.pt")) or any(path.glob("trainer_state_rank*.pt")):
        return path.parent, path.name
    raise DistillError(f"{path} is not a checkpoint: no 'latest' marker and no DeepSpeed checkpoint files")


def _model_states(tag_dir: Path) -> dict:
    """Rank 0's model states: its own file under ZeRO-3, the one file for all ranks under ZeRO-0/1/2
    (memory-mapped: under ZeRO-0 it holds the whole model and its optimizer)."""
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if not (tag_dir / name).is_file():
        name = "mp_rank_00_model_states.pt"
    return torch.load(tag_dir / name, map_location="cpu", weights_only=False, mmap=True)


def check_complete(root: Path, tag: str) -> tuple[int, int]:
    """(world size, ZeRO stage) of an intact checkpoint: every file it was written with, unchanged."""
    from distill.train import checkpoint

    tag_dir = root / tag
    problem = checkpoint.verify(tag_dir)
    if problem:
        raise DistillError(f"checkpoint {tag_dir} is damaged or incomplete: {problem}")
    stage = int(_model_states(tag_dir)["ds_config"].get("zero_optimization", {}).get("stage", 0))
    return int(checkpoint.read_manifest(tag_dir)["world_size"]), stage


def export_checkpoint(path: str | Path, out_dir: str | Path, dtype: Optional[torch.dtype] = None,
                      model_dir: Optional[str] = None, max_shard_size: str = "5GB") -> dict[str, Any]:
    """Rebuild the student of a ZeRO checkpoint on CPU and write it as a Hugging Face directory.

    ``model_dir`` supplies config and tokenizer when the checkpoint does not hold them (or to check
    against another model: a checkpoint of a different shape is refused)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    root, tag = resolve_checkpoint(path)
    world, stage = check_complete(root, tag)
    files = Path(model_dir) if model_dir else root / tag / MODEL_FILES
    if not (files / "config.json").is_file():
        raise DistillError(f"no model config for checkpoint {root / tag}: pass --model with the student's directory")
    try:
        config = AutoConfig.from_pretrained(files)
        tokenizer = AutoTokenizer.from_pretrained(files)
    except (OSError, ValueError) as exc:
        raise DistillError(f"cannot read the model files in {files}: {first_line(exc)}") from None
    generation_config = None
    if (files / "generation_config.json").is_file():
        generation_config = GenerationConfig.from_pretrained(files)
    _check_shapes(root / tag, stage, config, files)
    state = {k[len("model."):]: v for k, v in _full_state(root, tag, stage).items() if k.startswith("model.")}
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise DistillError(f"checkpoint {root / tag} holds weights that are not finite ({bad}): not exported")
    run_config, results = (_read_json(p) for p in (files / "run_config.json", root.parent / "eval_results.json"))
    write_model_dir(config, state, tokenizer, Path(out_dir), dtype, model_card(config, run_config, results),
                    max_shard_size, generation_config)
    return {"checkpoint": str(root / tag), "world_size": world, "tensors": len(state), "out_dir": str(out_dir)}


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def _full_state(root: Path, tag: str, stage: int) -> dict[str, torch.Tensor]:
    """The engine module's full state dict, in float32."""
    if stage == 0:
        # Saved whole, as the module's own state dict, which DeepSpeed's consolidation does not read. With
        # bf16 these are the bf16 weights: the fp32 master copy sits in a BF16_Optimizer state it cannot read.
        module = _model_states(root / tag)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    except Exception as exc:  # a torn or foreign file: DeepSpeed raises many types
        raise DistillError(f"cannot consolidate checkpoint {root / tag}: {first_line(exc)}") from None


def _check_shapes(tag_dir: Path, stage: int, config, files: Path) -> None:
    """The checkpoint's parameter shapes must be this model's (a checkpoint of another model is refused)."""
    state = _model_states(tag_dir)
    if stage == 0:
        shapes = {k: tuple(v.shape) for k, v in state["module"].items()}
    else:
        shapes = {}
        for group in state.get("param_shapes") or []:
            shapes.update(group)
        shapes.update(state.get("frozen_param_shapes") or {})
    model = _skeleton(config)
    # the module state dict (ZeRO-0) holds buffers and tied copies too; ZeRO-1/2/3 shapes only parameters
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    saved = {k[len("model."):]: tuple(v) for k, v in shapes.items() if k.startswith("model.")}
    if not saved:
        raise DistillError(f"checkpoint {tag_dir} holds no student weights (no 'model.' parameters)")
    for name, shape in saved.items():
        if expected.get(name) != shape:
            what = (f"{name} has shape {shape} there, {expected[name]} in the model" if name in expected
                    else f"it holds {name}, which the model does not have")
            raise DistillError(f"checkpoint {tag_dir} is not a checkpoint of the model in {files}: {what}")
    absent = sorted(set(dict(model.named_parameters())) - set(saved) - _tied_keys(model))
    if absent:
        raise DistillError(f"checkpoint {tag_dir} is not a checkpoint of the model in {files}: it lacks {absent[0]}")
