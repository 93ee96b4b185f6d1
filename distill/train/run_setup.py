"""Everything before a run's first step. ``check_inputs`` does every cheap check before anything
expensive (models, data columns, configs); ``setup`` then joins the ranks, holds the output directory,
finds the checkpoint to resume, and builds both engines, the data and the state to continue from.
``loop.Trainer`` runs the steps on what it builds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distill.config.resume import fit_accumulation, global_batch, resume_changes
from distill.config.settings import RunConfig
from distill.data.objectives import check_objective
from distill.data.stream import BatchStream, check_enough_examples, loader_workers
from distill.data.teacher_cache import CachedTeacherCollator, TeacherCache, with_example_ids
from distill.data.token_alignment import CrossTokenizerCollator, SharedVocab
from distill.errors import DistillError
from distill.infer.export import MODEL_FILES
from distill.losses.objective import Objective
from distill.models.architectures import ENCODER_ONLY, model_kind
from distill.models.capture import register_attention
from distill.models.loading import check_pair, hidden_size, load_model_config, load_tokenizer, rank_param_counts
from distill.runtime.environment import rank_env
from distill.runtime.process_group import join_process_group, on_rank0
from distill.runtime.stops import StopRequest, StopVote
from distill.runtime.dsconfig import read_ds_config, resolve_ds_config, with_universal_load
from distill.train import checkpoint, engines, run_dir, training_data, universal
from distill.train.divergence import DivergenceWatch
from distill.train.evaluator import Evaluator
from distill.train.example_ids import ExampleIds
from distill.train.state import TrainState
from distill.train.step import forward


class RunSetup:
    """A run up to its first step: its checks, its ranks, its output directory, engines and data."""

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
        world = rank_env().world
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
        self.train_data, self.eval_data, self.data_identity = training_data.examples(cfg, self.tokenizer)
        check_enough_examples(len(self.train_data), cfg.training.micro_batch_size,
                              cfg.training.gradient_accumulation_steps, world)
        if self.cache is not None:
            self.cache.check_run(cfg, self.train_data, self.tokenizer, self.student_config, self.teacher_config)
            self._check_cache_epochs(world)
        self.collate = self.train_collate = training_data.collator(self.tokenizer, self.student_config, cfg)
        if self.shared_vocab is not None:
            features = bool(cfg.loss.feature_terms())
            teacher_collate = training_data.collator(self.teacher_tokenizer, self.teacher_config, cfg)
            self.train_collate = CrossTokenizerCollator(self.collate, teacher_collate, self.shared_vocab, features)
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
        """The checks, the process group and the output directory, then the engines, the data, the state
        to resume and what watches the run."""
        t = self.cfg.training
        self.check_inputs()
        join_process_group()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.accelerator.device_name() != "cpu":
            self.accelerator.set_device(rank_env().local_rank)  # before zero.Init places any shard
        self.device = torch.device(self.accelerator.current_device_name())
        self._claim_output_dir()
        _seed_everything(t.seed + self.rank)
        self._build_engines()
        self._build_data()
        if self.resume_tag is not None:
            self.state.load_state_dict(checkpoint.load(self.student, self.ckpt_dir, self.resume_tag, self.rank,
                                                       self.world, self.universal))
            checkpoint.apply_optimizer_settings(self.scheduler, t.learning_rate, t.weight_decay)
            if checkpoint.world_size_of(self.ckpt_dir / self.resume_tag) != self.world:
                # the saved RNG streams belonged to the old ranks: new ones, the same on every such resume
                _seed_everything(int(np.random.SeedSequence([t.seed, self.rank, self.step]).generate_state(1)[0]))
        if t.record_example_ids:
            self.example_ids = ExampleIds(self.out, self.rank, self.world, self.step, t.gradient_accumulation_steps)
        self.evaluator = Evaluator(self.cfg, self.student, self.tokenizer, self.eval_data, self.collate,
                                   lambda engine, batch, loss: forward(engine, self.models, batch, loss), self.device, self.out,
                                   self._partitioned_student)
        self.stop_vote = StopVote()
        self.divergence = DivergenceWatch(t.max_nonfinite_steps, self.device, self._all_reduce_max,
                                          lambda: checkpoint.read_latest(self.ckpt_dir))
        self._report_setup()

    def _build_engines(self) -> None:
        """The teacher's engine (when the objective reads the live teacher), the student's, and how the step
        drives them."""
        cfg, objective = self.cfg, self.objective
        if objective.captures_attention:
            register_attention()
        if objective.needs_teacher:
            self.teacher, self._teacher_ds_alive = engines.teacher_engine(cfg, self.teacher_config, self.ds["teacher"],
                                                                          objective)
        ds = self.ds["student"] if self.universal is None else with_universal_load(self.ds["student"])
        self.student, self.scheduler, self._student_ds_alive = engines.student_engine(cfg, self.student_config, ds,
                                                                                      objective)
        self.models = engines.step_models(cfg, self.student_config, self.student, self.teacher, self.world)

    def _build_data(self) -> None:
        """This rank's stream of training micro-batches and the run state that holds its position."""
        cfg, t = self.cfg, self.cfg.training
        if self.shared_vocab is not None:
            pairs = (self.shared_vocab.mined_pairs() if cfg.loss.cross_tokenizer == "mined" else
                     (self.shared_vocab.student_ids, self.shared_vocab.teacher_ids))
            self.objective.shared_ids = tuple(ids.to(self.device) for ids in pairs)
        train = ((with_example_ids(self.train_data), CachedTeacherCollator(self.collate, self.cache)) if self.cache
                 else (self.train_data, self.train_collate))
        # data.num_workers processes make the next micro-batches while the step runs; pinned, they copy
        # to a GPU without blocking
        gpu = self.device.type == "cuda"
        self.stream = BatchStream(*train, t.micro_batch_size, self.rank, self.world, t.seed, t.gradient_accumulation_steps,
                                  loader_workers(cfg.data.num_workers, gpu), pin_memory=gpu)
        self.state = TrainState(self.stream, self.objective, self.run_id)

    def _claim_output_dir(self) -> None:
        """Before any model loads: hold the output directory, find the intact checkpoint to resume
        from, and refuse a start that would overwrite an earlier run or change what its state means."""
        t = self.cfg.training
        on_rank0(self._hold_output_dir)
        self.resume_tag = checkpoint.resolve_resume(self.ckpt_dir, t.resume, self.world, self.rank, self._gather,
                                                    self._say)
        if self.resume_tag is None:
            on_rank0(lambda: run_dir.prepare(self.out, t.resume, self.resume_tag, t.overwrite))
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
        on_rank0(lambda: run_dir.prepare(self.out, t.resume, self.resume_tag, t.overwrite))
        if written != self.world and universal.needed(tag_dir):
            found = universal.problem(tag_dir, self.rank, self.world, self._gather)
            on_rank0(lambda: universal.prepare(tag_dir, written, self.world, found, self._say))
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
        run_dir.write_json(self.out / "run_info.json", info)
        parts = [f"world size {self.world}"]
        for name in ("teacher", "student"):
            if name in info:
                total, mine = info[name]["params"], info[name]["params_per_rank"][0]
                parts.append(f"{name} {total / 1e6:.2f}M params, {mine / total:.0%} of them on rank 0")
        if self.resume_tag:
            parts.append(f"resumed from {self.ckpt_dir / self.resume_tag} at step {self.step}")
        print("distill: " + "; ".join(parts), flush=True)

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    def _all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
