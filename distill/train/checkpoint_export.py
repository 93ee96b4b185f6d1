"""Offline export: the student of a checkpoint on disk, rebuilt on CPU whatever world size wrote it, as a
Hugging Face directory (``distill export``), through DeepSpeed's own fp32 consolidation of the partitioned
optimizer state (ZeRO-1/2/3), or from the whole module state that ZeRO-0 saves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from distill.errors import DistillError, first_line
from distill.infer.export import MODEL_FILES, model_card, skeleton, tied_keys, write_model_dir
from distill.train import checkpoint


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoints directory, tag) from a run directory, a checkpoints directory or a tag directory."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DistillError(f"checkpoint not found: {path}")
    for root in (path / "checkpoints", path):
        latest = checkpoint.read_latest(root)
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
    model = skeleton(config)
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
    absent = sorted(set(dict(model.named_parameters())) - set(saved) - tied_keys(model))
    if absent:
        raise DistillError(f"checkpoint {tag_dir} is not a checkpoint of the model in {files}: it lacks {absent[0]}")
