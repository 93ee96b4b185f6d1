"""Loading teacher and student: cheap checks first, then ``from_pretrained`` straight into ZeRO-3 shards.

With a ``HfDeepSpeedConfig`` alive, transformers builds the model inside ``deepspeed.zero.Init``,
so each rank only ever holds its own partition of the weights, from the moment they exist.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from distill.dtypes import torch_dtype
from distill.models.architectures import ENCODER_DECODER, ENCODER_ONLY, model_kind
from distill.errors import DistillError, first_line
from distill.paths import hub_reachable, is_local_path


@dataclass
class ModelConfig:
    """A teacher or student: a local Hugging Face directory or a hub id, and its DeepSpeed config (the
    ``student`` / ``teacher`` settings; here, beside their loader, so the models sit below the settings)."""

    path: str = ""
    ds_config: str = ""
    revision: Optional[str] = None
    # SDPA keeps attention fast; feature capture never needs the whole model in eager mode.
    attn_implementation: str = "sdpa"

    def validate(self, prefix: str) -> None:
        if not self.path:
            raise DistillError(f"{prefix}.path is required")
        if not self.ds_config:
            raise DistillError(f"{prefix}.ds_config is required")


def load_model_config(mc: ModelConfig, role: str):
    """The model's config, without its weights: the cheap check that the model exists."""
    from transformers import AutoConfig

    path = Path(mc.path).expanduser()
    if is_local_path(mc.path) and not (path / "config.json").is_file():
        what = "not found" if not path.exists() else "has no config.json"
        raise DistillError(f"{role}.path {mc.path} {what}")
    if not path.exists() and not _in_hub_cache(mc) and not hub_reachable():
        raise DistillError(f"{role}.path {mc.path} is not a directory here, and the hub cannot be reached to look it "
                           "up as a model id (a local path: check the name)")
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else mc.path, revision=mc.revision)
    except Exception as exc:
        raise DistillError(f"cannot load {role} config from '{mc.path}': {first_line(exc)}") from None


def _in_hub_cache(mc: ModelConfig) -> bool:
    """Whether a hub id's config is in the local hub cache (usable with no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(mc.path, "config.json", revision=mc.revision), str)
    except ValueError:  # not a valid hub id either (the hub client's own validation error is a ValueError)
        return False


def load_tokenizer(mc: ModelConfig, role: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(Path(mc.path).expanduser()) if is_local_path(mc.path) else mc.path,
                                             revision=mc.revision)
    except Exception as exc:
        raise DistillError(f"cannot load the {role} tokenizer from '{mc.path}': {first_line(exc)}") from None


def hidden_size(config) -> int:
    for key in ("d_model", "hidden_size", "n_embd"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise DistillError(f"cannot tell the hidden size of a {type(config).__name__}")


@dataclass
class Vocab:
    """The vocabulary the two models share: logits are compared over the first ``size`` entries."""

    size: int


def check_pair(teacher_cfg, student_cfg, teacher_tok, student_tok, cross_tokenizer: Optional[str] = None) -> Vocab:
    """Refuse teacher/student pairs whose outputs cannot be compared token for token (or, with
    ``loss.cross_tokenizer``, span by span: any two tokenizers)."""
    if model_kind(teacher_cfg) != model_kind(student_cfg):
        raise DistillError(f"teacher is {model_kind(teacher_cfg)} but student is {model_kind(student_cfg)}")
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if cross_tokenizer is not None:
        for role, tok, config in (("teacher", teacher_tok, teacher_cfg), ("student", student_tok, student_cfg)):
            if config.vocab_size < len(tok):
                raise DistillError(f"the {role}'s vocab_size ({config.vocab_size}) is smaller than its tokenizer "
                                   f"({len(tok)} tokens)")
        return Vocab(size=student_cfg.vocab_size)
    if tv != sv:
        only_t = len(set(tv.items()) - set(sv.items()))
        raise DistillError(f"teacher and student tokenizers differ ({len(tv)} vs {len(sv)} tokens, "
                           f"{only_t} teacher tokens missing or renumbered in the student): set "
                           "loss.cross_tokenizer to uld, hybrid or mined to distill across tokenizers")
    # Embedding matrices may carry padding rows past the tokenizer (e.g. rounded to a multiple of 8);
    # those rows are never real tokens, so the logits are compared over the shared prefix.
    size = min(teacher_cfg.vocab_size, student_cfg.vocab_size)
    if size < len(tv):
        raise DistillError(f"a model's vocab_size ({size}) is smaller than its tokenizer ({len(tv)} tokens)")
    return Vocab(size=size)


def load_model(mc: ModelConfig, config, ds_config: dict[str, Any], precision: str,
               attn_implementation: Optional[str] = None) -> tuple[torch.nn.Module, Any]:
    """Build the model partitioned under ZeRO-3 (or whole, for a ZeRO-0/1/2 student).

    ``attn_implementation`` replaces ``mc.attn_implementation`` (the trainer passes the capturing
    SDPA when the loss needs attention from this model).

    Returns the model and the ``HfDeepSpeedConfig`` that must stay alive while it is in use:
    transformers consults it (through a weak reference) whenever it asks whether ZeRO-3 is on.
    """
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config)
    auto = auto_class(config)
    path = str(Path(mc.path).expanduser()) if is_local_path(mc.path) else mc.path
    with gather_for_late_init():
        model = auto.from_pretrained(path, revision=mc.revision, dtype=torch_dtype(precision),
                                     attn_implementation=attn_implementation or mc.attn_implementation)
    return model, keep_alive


@contextmanager
def gather_for_late_init():
    """After loading, transformers runs ``_init_weights`` on modules it does not consider initialised,
    even when their weights came from the checkpoint (Pegasus' sinusoidal position table). Under
    ZeRO-3 those weights are empty partitions there, so gather them around that call."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from transformers import PreTrainedModel

    original = PreTrainedModel._initialize_weights

    def initialize(self, module, *args, **kwargs):
        partitioned = [p for p in module.parameters(recurse=False)
                       if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE]
        if getattr(module, "_is_hf_initialized", False) or not partitioned:
            return original(self, module, *args, **kwargs)
        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
            return original(self, module, *args, **kwargs)

    PreTrainedModel._initialize_weights = initialize
    try:
        yield
    finally:
        PreTrainedModel._initialize_weights = original


def rank_param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole model), for ZeRO-3 partitioned or plain params."""
    local = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            local += p.ds_tensor.numel()
            total += p.ds_numel
        else:
            local += p.numel()
            total += p.numel()
    return local, total


def auto_class(config):
    """The transformers auto class of a model's language-modelling task: AutoModelForSeq2SeqLM,
    AutoModelForMaskedLM (encoder-only) or AutoModelForCausalLM."""
    import transformers

    kind = model_kind(config)
    return (transformers.AutoModelForSeq2SeqLM if kind == ENCODER_DECODER
            else transformers.AutoModelForMaskedLM if kind == ENCODER_ONLY else transformers.AutoModelForCausalLM)


def model_class(config):
    """The task class (*ForConditionalGeneration, *ForCausalLM, *ForMaskedLM) of a config, or None if
    unknown.

    Instantiating it directly (not through ``from_config``) stays outside ZeRO-3's ``zero.Init``
    even while a run has ZeRO-3 on: export builds plain skeletons from it."""
    try:
        return auto_class(config)._model_mapping[type(config)]
    except (KeyError, DistillError):
        return None
