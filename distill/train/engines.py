"""The two DeepSpeed engines of a run, and how the step drives them: the frozen teacher, and the
trainable student with the objective's feature capture, its projections and the learning-rate schedule."""

from __future__ import annotations

from typing import Any

import torch

from distill.config.settings import RunConfig
from distill.dtypes import torch_dtype
from distill.losses.objective import Objective
from distill.losses.schedules import lr_multiplier
from distill.models.architectures import ENCODER_ONLY, model_kind
from distill.models.capture import CAPTURE_ATTENTION, FeatureModel
from distill.models.loading import load_model
from distill.train.step import Models


def teacher_engine(cfg: RunConfig, config, ds_config: dict[str, Any], objective: Objective) -> tuple[Any, Any]:
    """The teacher's engine, frozen and in eval mode, and the object that must stay alive with it (``load_model``)."""
    import deepspeed

    model, keep_alive = load_model(cfg.teacher, config, ds_config, cfg.training.precision,
                                   CAPTURE_ATTENTION if objective.teacher_request.attention else None)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=FeatureModel(model, objective.teacher_request, "teacher").eval(),
                                      config=ds_config)
    engine.eval()
    return engine, keep_alive


def student_engine(cfg: RunConfig, config, ds_config: dict[str, Any], objective: Objective) -> tuple[Any, Any, Any]:
    """The student's engine, its learning-rate scheduler, and the object that must stay alive with it."""
    import deepspeed

    t = cfg.training
    model, keep_alive = load_model(cfg.student, config, ds_config, t.precision,
                                   CAPTURE_ATTENTION if objective.student_request.attention else None)
    freeze(model, t.freeze_embeddings, t.freeze_encoder)
    student = FeatureModel(model, objective.student_request, "student",
                           objective.build_projections(torch_dtype(t.precision)), objective.project)
    # Keep the schedule in the run config: one name for it everywhere, no DeepSpeed scheduler section.
    schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
        opt, lambda s: lr_multiplier(t.lr_schedule, s, t.warmup_steps, t.max_steps, t.min_lr_ratio))
    engine, _, _, scheduler = deepspeed.initialize(
        model=student, model_parameters=[p for p in student.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=schedule)
    return engine, scheduler, keep_alive


def step_models(cfg: RunConfig, student_config, student, teacher, world: int) -> Models:
    """What ``train_step`` drives: the engines, how to feed them, and the loss scale that makes each step's
    gradients its global token averages."""
    t, encoder_decoder = cfg.training, student_config.is_encoder_decoder
    return Models(student, teacher, encoder_decoder, cfg.data.packing and not encoder_decoder,
                  cfg.loss.teacher_uses_student_encoder, loss_scale=world * t.gradient_accumulation_steps,
                  check_grad_norm=t.precision != "fp16", encoder_only=model_kind(student_config) == ENCODER_ONLY)


def freeze(model: torch.nn.Module, embeddings: bool, encoder: bool) -> None:
    """Freeze what distilBART froze: token and position embeddings (and a tied LM head), the encoder."""
    if embeddings:
        model.get_input_embeddings().requires_grad_(False)
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("embed_tokens", "embed_positions", "shared", "wpe", "position_embeddings",
                                           "token_type_embeddings"):
                module.requires_grad_(False)
    if encoder:
        model.get_encoder().requires_grad_(False)
