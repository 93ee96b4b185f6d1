"""The distillation trainer: a frozen ZeRO-3 teacher and a trainable student on the same ranks.

``setup`` does every cheap check before anything expensive (models, data columns, configs, the output
directory and the checkpoint to resume), then builds both engines; ``train`` is the loop around
``step.train_step``: step, log, evaluate, save, stop.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distill.config.resume import fit_accumulation, global_batch, resume_changes
from distill.config.settings import FEATURE_WEIGHTS, RunConfig
from distill.data.collate import CausalCollator, Seq2SeqCollator
from distill.data.loading import drop_overlong, load_split
from distill.data.objectives import TextObjectiveCollator, check_objective, text_blocks
from distill.data.stream import BatchStream, check_enough_examples
from distill.data.teacher_cache import CachedTeacherCollator, TeacherCache, split_digest, with_example_ids
from distill.data.token_alignment import CrossTokenizerCollator, SharedVocab
from distill.errors import DistillError
from distill.infer.export import MODEL_FILES, export_student, model_card, save_model_files
from distill.losses.objective import AGREEMENT, Objective
from distill.losses.schedules import lr_multiplier
from distill.models.architectures import ENCODER_ONLY, model_kind
from distill.models.capture import CAPTURE_ATTENTION, FeatureModel, register_attention
from distill.dtypes import torch_dtype
from distill.models.loading import (check_pair, hidden_size, load_model, load_model_config, load_tokenizer,
                                    rank_param_counts)
from distill.runtime.cluster import StopRequest, StopVote, join_process_group
from distill.runtime.dsconfig import read_ds_config, resolve_ds_config, with_universal_load
from distill.train import checkpoint, run_dir, universal
from distill.train.evaluator import Evaluator
from distill.train.example_ids import ExampleIds
from distill.train.monitor import Monitor, memory_report, peak_memory_gb, reduce_max, reduce_mean
from distill.train.on_policy import is_on_policy, sample_batch, sampling_config
from distill.train.state import TrainState
from distill.train.step import DivergenceWatch, Models, PhaseTimer, Window, forward, train_step


def _world() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = Path(cfg.training.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.teacher = None
        self.state: TrainState | None = None
        self.stop: StopRequest | None = None  # armed by the launcher before set-up
        self.stopped = False
        self.lock: run_dir.RunLock | None = None  # rank 0 holds the output directory
        self.run_id = checkpoint.new_run_id()  # a resumed run keeps its checkpoint's: pruning stays in the run
        self.resume_tag: str | None = None
        self.universal: Path | None = None  # the converted copy of a checkpoint written by another world size
        self.example_ids: ExampleIds | None = None

    @property
    def step(self) -> int:
        return self.state.step if self.state is not None else 0

    # ---- set-up --------------------------------------------------------------------------------

    def check_inputs(self) -> None:
        """Everything that can be refused without loading a model or starting ranks."""
        cfg = self.cfg
        self.student_config = load_model_config(cfg.student, "student")
        self.tokenizer = load_tokenizer(cfg.student, "student")
        self.raw_ds = {"student": read_ds_config(cfg.student.ds_config, "student")}
        self.vocab = self.teacher_config = self.shared_vocab = None
        self.cache = TeacherCache(cfg.teacher_cache) if cfg.teacher_cache else None
        if cfg.live_teacher:
            self.teacher_config = load_model_config(cfg.teacher, "teacher")
            self.teacher_tokenizer = load_tokenizer(cfg.teacher, "teacher")
            self.vocab = check_pair(self.teacher_config, self.student_config, self.teacher_tokenizer, self.tokenizer,
                                    cfg.loss.cross_tokenizer)
            if cfg.loss.cross_tokenizer is not None:
                self.shared_vocab = SharedVocab.of(self.tokenizer, self.teacher_tokenizer, self.student_config.vocab_size,
                                                   self.teacher_config.vocab_size, cfg.loss.cross_tokenizer == "mined")
            self.raw_ds["teacher"] = read_ds_config(cfg.teacher.ds_config, "teacher")
        if cfg.training.freeze_encoder and not self.student_config.is_encoder_decoder:
            raise DistillError("training.freeze_encoder needs an encoder-decoder student")
        if model_kind(self.student_config) == ENCODER_ONLY and (cfg.eval.generate or cfg.loss.on_policy_fraction):
            raise DistillError("the student is an encoder-only masked LM, which does not generate text: set "
                               "eval.generate=false and loss.on_policy_fraction=0")
        world = _world()[1]
        from deepspeed.accelerator import get_accelerator

        self.accelerator = get_accelerator()
        if cfg.training.precision == "fp16" and self.accelerator.device_name() == "cpu":
            raise DistillError("training.precision=fp16 needs a GPU: on CPU use fp32 or bf16")
        # Every layer map, head count and width is checked here, from the configs alone.
        zero3 = self.raw_ds["student"].get("zero_optimization", {}).get("stage") == 3
        self.objective = Objective(cfg.loss, cfg.training.max_steps, self.student_config, self.teacher_config,
                                   partitioned_student=zero3, cache_vocab=self.cache.vocab if self.cache else None)
        for role, request in (("student", self.objective.student_request), ("teacher", self.objective.teacher_request)):
            if request.attention and getattr(cfg, role).attn_implementation != "sdpa":
                raise DistillError(f"attention capture runs on SDPA: set {role}.attn_implementation=sdpa "
                                   f"(got {getattr(cfg, role).attn_implementation!r})")
        check_objective(cfg.data.objective, model_kind(self.student_config), "student")
        self.train_data = load_split(cfg.data, cfg.data.train_split, "train")
        self.eval_data = load_split(cfg.data, cfg.data.eval_split, "eval") if cfg.data.eval_split else None
        self.data_identity = {"examples": len(self.train_data), "text": split_digest(
            self.train_data, [c for c in (cfg.data.source_column, cfg.data.target_column) if c is not None])}
        if cfg.data.objective is not None:  # raw text cut into blocks, each one example
            causal = cfg.data.objective == "causal"
            self.train_data = text_blocks(self.train_data, self.tokenizer, cfg.data, causal)
            if self.eval_data is not None:
                self.eval_data = text_blocks(self.eval_data, self.tokenizer, cfg.data, causal)
        elif not cfg.data.truncation:
            self.train_data = drop_overlong(self.train_data, cfg.data, self.tokenizer)
            if self.eval_data is not None:
                self.eval_data = drop_overlong(self.eval_data, cfg.data, self.tokenizer)
        check_enough_examples(len(self.train_data), cfg.training.micro_batch_size,
                              cfg.training.gradient_accumulation_steps, world)
        if self.cache is not None:
            self.cache.check_run(cfg, self.train_data, self.tokenizer, self.student_config, self.teacher_config)
            self._check_cache_epochs(world)
        self.collate = self.train_collate = _collator(self.tokenizer, self.student_config, cfg)
        if self.shared_vocab is not None:
            features = any(cfg.loss.active(k) for k in FEATURE_WEIGHTS)
            self.train_collate = CrossTokenizerCollator(self.collate, _collator(self.teacher_tokenizer, self.teacher_config,
                                                                               cfg), self.shared_vocab, features)
            if features:  # the first examples already split differently: refused before any model loads
                self.train_collate([self.train_data[i] for i in range(min(256, len(self.train_data)))])
        # Configs are resolved now (not after the models load) so a bad DeepSpeed file fails fast.
        self._resolve_ds_configs(world)

    def _check_cache_epochs(self, world: int) -> None:
        """A text objective draws new masks each epoch; the cache holds the teacher at the first epoch's."""
        t, objective = self.cfg.training, self.cfg.data.objective
        per_epoch = len(self.train_data) // (t.micro_batch_size * t.gradient_accumulation_steps * world)
        if objective not in (None, "causal") and t.max_steps > per_epoch:
            raise DistillError(f"teacher.cache holds the teacher at the first epoch's masks, and data.objective={objective} "
                               f"draws new ones each epoch: training.max_steps {t.max_steps} runs past the "
                               f"{per_epoch} steps of one epoch; lower it, or distill from the live teacher")

    def _resolve_ds_configs(self, world: int) -> None:
        cfg = self.cfg
        self.ds = {role: resolve_ds_config(raw, cfg, role, world,
                                           hidden_size(self.student_config if role == "student" else self.teacher_config),
                                           self.accelerator.device_name(), getattr(cfg, role).ds_config)
                   for role, raw in self.raw_ds.items()}

    def setup(self) -> None:
        import deepspeed

        cfg, t = self.cfg, self.cfg.training
        self.check_inputs()
        join_process_group()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.accelerator.device_name() != "cpu":
            self.accelerator.set_device(_world()[2])  # before zero.Init places any shard
        self.device = torch.device(self.accelerator.current_device_name())
        self._claim_output_dir()
        _seed_everything(t.seed + self.rank)

        objective = self.objective
        if objective.captures_attention:
            register_attention()
        if objective.needs_teacher:
            teacher, self._teacher_ds_alive = load_model(
                cfg.teacher, self.teacher_config, self.ds["teacher"], t.precision,
                CAPTURE_ATTENTION if objective.teacher_request.attention else None)
            teacher.requires_grad_(False)
            teacher = FeatureModel(teacher, objective.teacher_request, "teacher").eval()
            self.teacher, *_ = deepspeed.initialize(model=teacher, config=self.ds["teacher"])
            self.teacher.eval()
        model, self._student_ds_alive = load_model(
            cfg.student, self.student_config, self.ds["student"], t.precision,
            CAPTURE_ATTENTION if objective.student_request.attention else None)
        _freeze(model, t.freeze_embeddings, t.freeze_encoder)
        student = FeatureModel(model, objective.student_request, "student",
                               objective.build_projections(torch_dtype(t.precision)), objective.project)
        # Keep the schedule in the run config: one name for it everywhere, no DeepSpeed scheduler section.
        schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
            opt, lambda s: lr_multiplier(t.lr_schedule, s, t.warmup_steps, t.max_steps, t.min_lr_ratio))
        self.student, _, _, self.scheduler = deepspeed.initialize(
            model=student, model_parameters=[p for p in student.parameters() if p.requires_grad],
            config=self.ds["student"] if self.universal is None else with_universal_load(self.ds["student"]),
            lr_scheduler=schedule)

        encoder_decoder = self.student_config.is_encoder_decoder
        collate = self.collate
        train = ((with_example_ids(self.train_data), CachedTeacherCollator(collate, self.cache)) if self.cache
                 else (self.train_data, self.train_collate))
        if self.shared_vocab is not None:
            pairs = (self.shared_vocab.mined_pairs() if cfg.loss.cross_tokenizer == "mined" else
                     (self.shared_vocab.student_ids, self.shared_vocab.teacher_ids))
            objective.shared_ids = tuple(ids.to(self.device) for ids in pairs)
        self.stream = BatchStream(*train, t.micro_batch_size, self.rank, self.world, t.seed, t.gradient_accumulation_steps)
        self.state = TrainState(self.stream, self.objective, self.run_id)
        if self.resume_tag is not None:
            self.state.load_state_dict(checkpoint.load(self.student, self.ckpt_dir, self.resume_tag, self.rank,
                                                       self.world, self.universal))
            checkpoint.apply_optimizer_settings(self.scheduler, t.learning_rate, t.weight_decay)
            if checkpoint.world_size_of(self.ckpt_dir / self.resume_tag) != self.world:
                # the saved RNG streams belonged to the old ranks: new ones, the same on every such resume
                _seed_everything(int(np.random.SeedSequence([t.seed, self.rank, self.step]).generate_state(1)[0]))
        if t.record_example_ids:
            self.example_ids = ExampleIds(self.out, self.rank, self.world, self.step, t.gradient_accumulation_steps)
        self.models = Models(self.student, self.teacher, encoder_decoder, cfg.data.packing and not encoder_decoder,
                             cfg.loss.teacher_uses_student_encoder, loss_scale=self.world * t.gradient_accumulation_steps,
                             check_grad_norm=t.precision != "fp16",
                             encoder_only=model_kind(self.student_config) == ENCODER_ONLY)
        self.evaluator = Evaluator(cfg, self.student, self.tokenizer, self.eval_data, collate,
                                   lambda engine, batch, loss: forward(engine, self.models, batch, loss), self.device, self.out,
                                   self._partitioned_student)
        self.stop_vote = StopVote()
        self.divergence = DivergenceWatch(t.max_nonfinite_steps, self.device, self._all_reduce_max,
                                          lambda: checkpoint.read_latest(self.ckpt_dir))
        self._report_setup()

    def _claim_output_dir(self) -> None:
        """Before any model loads: hold the output directory, find the intact checkpoint to resume
        from, and refuse a start that would overwrite an earlier run or change what its state means."""
        t = self.cfg.training
        self._on_rank0(self._hold_output_dir)
        self.resume_tag = checkpoint.resolve_resume(self.ckpt_dir, t.resume, self.world, self.rank, self._gather,
                                                    self._say)
        if self.resume_tag is None:
            self._on_rank0(lambda: run_dir.prepare(self.out, t.resume, self.resume_tag, t.overwrite))
            return
        tag_dir = self.ckpt_dir / self.resume_tag
        self.run_id = checkpoint.run_id_of(tag_dir)
        saved = json.loads((tag_dir / MODEL_FILES / "run_config.json").read_text())
        written = checkpoint.world_size_of(tag_dir)
        self._keep_global_batch(saved, written)
        changed = resume_changes(saved, self.cfg.to_dict())
        if changed:
            self._say(f"distill: resuming {self.resume_tag} with changed settings: {', '.join(changed)}")
        data_line = checkpoint.check_data(tag_dir, self.data_identity, t.allow_data_change)
        if data_line:
            self._say(data_line)
        self._on_rank0(lambda: run_dir.prepare(self.out, t.resume, self.resume_tag, t.overwrite))
        if written != self.world and universal.needed(tag_dir):
            found = universal.problem(tag_dir, self.rank, self.world, self._gather)
            self._on_rank0(lambda: universal.prepare(tag_dir, written, self.world, found, self._say))
            self.universal = tag_dir / universal.UNIVERSAL

    def _keep_global_batch(self, saved: dict[str, Any], written: int) -> None:
        """A resume keeps the checkpoint's global batch (so its data position and every step's examples
        stay the same) on any number of ranks: the accumulation steps follow the world size and the
        micro-batch size, or the run is refused, before any model loads, with what would fit."""
        t = self.cfg.training
        batch, before = global_batch(saved, written), saved["training"]
        accumulation = fit_accumulation(batch, t.micro_batch_size, t.gradient_accumulation_steps, self.world,
                                        before["gradient_accumulation_steps"])
        if (t.micro_batch_size, accumulation, self.world) != (before["micro_batch_size"],
                                                              before["gradient_accumulation_steps"], written):
            self._say(f"distill: {self.resume_tag} took global batches of {batch} examples as {written} ranks x "
                      f"{before['micro_batch_size']} x {before['gradient_accumulation_steps']} accumulation steps; "
                      f"this run takes them as {self.world} ranks x training.micro_batch_size {t.micro_batch_size} x "
                      f"training.gradient_accumulation_steps {accumulation}")
        if accumulation != t.gradient_accumulation_steps:
            t.gradient_accumulation_steps = accumulation
            self._resolve_ds_configs(self.world)

    def _hold_output_dir(self) -> None:
        self.lock = run_dir.RunLock(self.out)
        self.lock.acquire()

    def _on_rank0(self, action) -> None:
        """Run ``action`` on rank 0 only; its refusal is raised on every rank."""
        error = None
        if self.rank == 0:
            try:
                action()
            except DistillError as exc:
                error = str(exc)
        if (error := self._gather(error)[0]) is not None:
            raise DistillError(error)

    def _gather(self, value: Any) -> list:
        values: list = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def _say(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)

    def close(self) -> None:
        """Release the output directory (every exit path of the launcher calls this)."""
        if getattr(self, "stop_vote", None) is not None:
            self.stop_vote.close()
        if self.lock is not None:
            self.lock.release()

    @property
    def _partitioned_student(self) -> bool:
        return self.ds["student"]["zero_optimization"].get("stage") == 3

    def _report_setup(self) -> None:
        """Print and record how the models are partitioned: every rank's share of each."""
        info: dict[str, Any] = {"world_size": self.world, "resumed_from": self.resume_tag, "step": self.step}
        for name, engine in (("teacher", self.teacher), ("student", self.student)):
            if engine is None:
                continue
            local, total = rank_param_counts(engine.module)
            per_rank = [None] * self.world
            dist.all_gather_object(per_rank, local)
            info[name] = {"params": total, "params_per_rank": per_rank}
        if self.rank != 0:
            return
        run_dir.record_config(self.out, self.cfg.to_yaml(), self.step)
        _write_json(self.out / "run_info.json", info)
        parts = [f"world size {self.world}"]
        for name in ("teacher", "student"):
            if name in info:
                total, mine = info[name]["params"], info[name]["params_per_rank"][0]
                parts.append(f"{name} {total / 1e6:.2f}M params, {mine / total:.0%} of them on rank 0")
        if self.resume_tag:
            parts.append(f"resumed from {self.ckpt_dir / self.resume_tag} at step {self.step}")
        print("distill: " + "; ".join(parts), flush=True)

    # ---- the loop ------------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """Step, log, evaluate, save, stop. Only log steps read values from the device."""
        t, state = self.cfg.training, self.state
        monitor = Monitor(self.out, self.rank, t.max_steps, state.step, self.cfg.flat())
        self.student.train()
        window, timer = Window(), PhaseTimer(self.device)
        peak_memory_gb(self.device)  # a reset: from here the peaks are the steps' (loading excluded)
        self.peak_gb = 0.0
        stalled, last = False, {}
        while state.step < t.max_steps:
            logs = (state.step + 1) % t.log_every == 0 or state.step + 1 == t.max_steps
            golds = [not is_on_policy(self.cfg.loss.on_policy_fraction, t.seed, state.step, m)
                     for m in range(t.gradient_accumulation_steps)]
            batches = [self._next_batch(gold) for gold in golds]
            result = train_step(self.models, self.objective, batches, golds, self._all_reduce, timer, agreement=logs)
            state.step += 1
            window.add(result, golds)
            self.divergence.add(result.nonfinite)
            # TAID's adaptive λ reads the step's global losses: a device all-reduce, no host sync
            self.objective.step_end(state.step, self._all_reduce_dict(result.terms) if self.objective.tracks_losses
                                    else None)
            monitor.advance()
            if logs:
                monitor.log(state.step, self._train_scalars(window, timer))
                window = Window()
                self.divergence.check(state.step, self._say)
            if t.eval_every and state.step % t.eval_every == 0 and state.step != t.max_steps:
                last = self._evaluation(monitor)
                stalled = self._stalled()
            stop = self.stop_vote.poll(self.stop.requested)
            if state.step % t.save_every == 0 or state.step == t.max_steps or stop or stalled:
                if not logs:  # a save waits on the device anyway: a streak of non-finite steps is read here too
                    self.divergence.check(state.step, self._say)
                self._save()
            if stop:  # Slurm's warning before a time limit or preemption: the job requeues and resumes here
                monitor.close({})
                self.stopped = True
                return {}
            if stalled:
                self._say(f"distill: {state.best['metric']} has not improved for {t.early_stopping_patience} evaluations "
                          f"(best {state.best['value']:.6g} at step {state.best['step']}): stopping at step {state.step}")
                break
        final = last if stalled else self._evaluation(monitor)
        if self.rank == 0:
            _write_json(self.out / "eval_results.json", {"step": state.step, **final})
        if t.export:
            model = self.student.module.model
            export_student(model, self.tokenizer, self.out / "final",
                           card=model_card(model.config, self.cfg.to_dict(), {"step": state.step, **final}))
        memory_report(self.out / "memory.json", self.teacher, self.student, self.device, self.cfg.training.precision,
                      max(self.peak_gb, peak_memory_gb(self.device)))
        monitor.close(final)
        return final

    def _next_batch(self, gold: bool) -> dict[str, torch.Tensor]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in next(self.stream).items()}
        if self.example_ids is not None:
            self.example_ids.add(self.state.step + 1, self.stream.last_ids)
        return batch if gold else self._sample_targets(batch)

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    def _all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def _all_reduce_dict(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keys = sorted(values)
        summed = self._all_reduce(torch.stack([values[k].float() for k in keys]))
        return dict(zip(keys, summed.unbind()))

    def _sample_targets(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch with targets the student samples itself (GKD), all ranks in step under ZeRO-3."""
        cfg, tok = self.cfg.loss, self.tokenizer
        model = self.student.module.model
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        sampling = sampling_config(model.generation_config, cfg.on_policy_max_new_tokens, cfg.on_policy_temperature,
                                   pad, tok.eos_token_id)
        self.student.eval()
        batch = sample_batch(model, batch, sampling, synced_gpus=self._partitioned_student and self.world > 1)
        self.student.train()
        return batch

    def _save(self) -> None:
        # inside a streak of non-finite (skipped) steps, the last checkpoint before it is kept
        keep = None if self.divergence.in_streak else self.cfg.training.keep_checkpoints
        checkpoint.save(self.student, self.ckpt_dir, self.state.step, self.state.state_dict(),
                        keep, self.state.run_id, self.rank, self.world, self._gather,
                        dist.barrier, self._write_model_files)

    def _write_model_files(self, tag_dir: Path) -> None:
        save_model_files(self.student.module.model, self.tokenizer, self.cfg.to_dict(), tag_dir / MODEL_FILES)
        checkpoint.write_atomic(tag_dir / checkpoint.DATA_RECORD, json.dumps(self.data_identity) + "\n")

    def _stalled(self) -> bool:
        """Whether eval.best_metric has not improved for training.early_stopping_patience evaluations."""
        patience, best = self.cfg.training.early_stopping_patience, self.state.best
        return patience is not None and best is not None and \
            self.state.step - best["step"] >= patience * self.cfg.training.eval_every

    def _evaluation(self, monitor: Monitor) -> dict[str, float]:
        """Evaluate, log scalars and samples; the evaluator exports the best student so far."""
        metrics, samples, self.state.best = self.evaluator.run(self.state.step, self.state.best)
        monitor.log(self.state.step, metrics)
        if samples:
            monitor.text("eval/samples", samples, self.state.step)
        return metrics

    def _train_scalars(self, window: Window, timer: PhaseTimer) -> dict[str, float]:
        """The window's losses (the mean over its steps of each step's global token average), speed, the
        schedule, memory and teacher-student agreement; every value reduced over ranks."""
        keys = sorted(window.terms)
        local = torch.cat([torch.stack([window.terms[k].double() for k in keys]), torch.tensor(
            [window.source_tokens, window.target_tokens], dtype=torch.float64, device=self.device)])
        values = self._all_reduce(local).tolist()
        scalars = {f"loss/{k}": v / window.steps for k, v in zip(keys, values)}
        source, target = values[-2:]
        seconds = max(time.perf_counter() - window.start, 1e-9)
        scalars["perf/tokens_per_sec"] = (source + target) / seconds
        scalars["perf/source_tokens_per_sec"] = source / seconds
        scalars["perf/target_tokens_per_sec"] = target / seconds
        scalars["perf/sec_per_step"] = seconds / window.steps  # everything: data, teacher, student, logging
        phases = timer.read()
        scalars.update(reduce_mean({f"perf/{phase}_sec_per_step": phases.get(phase, 0.0) / window.steps
                                    for phase in ("teacher", "student", "loss")
                                    if phase != "teacher" or self.objective.needs_teacher}, self.device))
        if self.cfg.loss.on_policy_fraction > 0:
            scalars["train/on_policy_share"] = window.on_policy / window.micro_batches
        for name, w in self.objective.weights().items():
            scalars[f"weight/{name}"] = w
        for name, v in self.objective.schedule_values().items():
            scalars[f"schedule/{name}"] = float(v)
        scalars["train/lr"] = self.scheduler.get_last_lr()[0]
        # what the optimizer, the clipping and the loss use now (a resume may change each)
        scalars["train/weight_decay"] = self.scheduler.optimizer.param_groups[0]["weight_decay"]
        scalars["train/max_grad_norm"] = float(self.student.gradient_clipping())
        scalars["train/temperature"] = self.objective.cfg.temperature
        norm = self.student.get_global_grad_norm()
        if norm is not None:
            scalars["train/grad_norm"] = float(norm)
        scalars["train/epoch"] = self.stream.epoch + self.stream.position / self.stream.batches_per_epoch
        peak = peak_memory_gb(self.device)
        self.peak_gb = max(self.peak_gb, peak)
        scalars.update(reduce_max({"perf/peak_memory_gb": peak}, self.device))
        if window.agreement is not None:
            *sums, n = self._all_reduce(window.agreement).tolist()
            if n > 0:
                scalars.update({f"agreement/{name}": value / n for name, value in zip(AGREEMENT, sums)})
        return scalars


def _collator(tokenizer, config, cfg: RunConfig):
    if cfg.data.objective is not None:
        return TextObjectiveCollator(tokenizer, cfg.data, cfg.training.seed, getattr(config, "decoder_start_token_id", None))
    return (Seq2SeqCollator(tokenizer, cfg.data, config.decoder_start_token_id) if config.is_encoder_decoder
            else CausalCollator(tokenizer, cfg.data))


def _freeze(model: torch.nn.Module, embeddings: bool, encoder: bool) -> None:
    """Freeze what distilBART froze: token and position embeddings (and a tied LM head), the encoder."""
    if embeddings:
        model.get_input_embeddings().requires_grad_(False)
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("embed_tokens", "embed_positions", "shared", "wpe", "position_embeddings",
                                           "token_type_embeddings"):
                module.requires_grad_(False)
    if encoder:
        model.get_encoder().requires_grad_(False)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    checkpoint.write_atomic(path, json.dumps(data, indent=2) + "\n")
