"""The distillation trainer: a frozen ZeRO-3 teacher and a trainable student on the same ranks.

``setup`` does every cheap check before anything expensive (models, data columns, configs,
checkpoint to resume), then builds both engines; ``train`` is the loop. Per micro-batch:
teacher forward without gradients, student forward, loss, backward, step.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from transformers.modeling_outputs import BaseModelOutput

from distill.train import checkpoint, run_dir
from distill.models.capture import CAPTURE_ATTENTION, FeatureModel, register_attention
from distill.runtime.cluster import StopRequest, join_process_group
from distill.config.settings import RunConfig
from distill.config.resume import resume_changes
from distill.data.collate import IGNORE_INDEX, CausalCollator, Seq2SeqCollator, causal_model_inputs
from distill.data.stream import BatchStream, eval_loader
from distill.data.loading import drop_overlong, load_split
from distill.runtime.dsconfig import read_ds_config, resolve_ds_config
from distill.errors import DistillError
from distill.infer.export import MODEL_FILES, export_student, model_card, save_model_files
from distill.models.loading import DTYPES, check_pair, hidden_size, load_model, load_model_config, load_tokenizer, rank_param_counts
from distill.train.monitor import Monitor, agreement_sums, peak_memory_gb, reduce_max, reduce_mean
from distill.losses.objective import Objective, Output, teacher_forced_sums
from distill.train.on_policy import is_on_policy, sample_batch, sampling_config
from distill.losses.schedules import lr_multiplier

SEQ2SEQ_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids")


def _world() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = Path(cfg.training.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.teacher = None
        self.step = 0
        self.best: dict[str, Any] | None = None  # best evaluation so far (eval.best_metric)
        self.stop: StopRequest | None = None  # armed by the launcher before set-up
        self.stopped = False
        self.lock: run_dir.RunLock | None = None  # rank 0 holds the output directory
        self.run_id = checkpoint.new_run_id()  # a resumed run keeps its checkpoint's: pruning stays in the run
        self.resume_tag: str | None = None
        self.nonfinite_streak = 0

    # ---- set-up --------------------------------------------------------------------------------

    def check_inputs(self) -> None:
        """Everything that can be refused without loading a model or starting ranks."""
        cfg = self.cfg
        self.student_config = load_model_config(cfg.student, "student")
        self.tokenizer = load_tokenizer(cfg.student, "student")
        self.raw_ds = {"student": read_ds_config(cfg.student.ds_config, "student")}
        self.vocab = self.teacher_config = None
        if cfg.uses_teacher:
            self.teacher_config = load_model_config(cfg.teacher, "teacher")
            self.vocab = check_pair(self.teacher_config, self.student_config,
                                    load_tokenizer(cfg.teacher, "teacher"), self.tokenizer)
            self.raw_ds["teacher"] = read_ds_config(cfg.teacher.ds_config, "teacher")
        if cfg.training.freeze_encoder and not self.student_config.is_encoder_decoder:
            raise DistillError("training.freeze_encoder needs an encoder-decoder student")
        world = _world()[1]
        from deepspeed.accelerator import get_accelerator

        self.accelerator = get_accelerator()
        if cfg.training.precision == "fp16" and self.accelerator.device_name() == "cpu":
            raise DistillError("training.precision=fp16 needs a GPU: on CPU use fp32 or bf16")
        # Every layer map, head count and width is checked here, from the configs alone.
        zero3 = self.raw_ds["student"].get("zero_optimization", {}).get("stage") == 3
        self.objective = Objective(cfg.loss, cfg.training.max_steps, self.student_config, self.teacher_config,
                                   partitioned_student=zero3)
        for role, request in (("student", self.objective.student_request), ("teacher", self.objective.teacher_request)):
            if request.attention and getattr(cfg, role).attn_implementation != "sdpa":
                raise DistillError(f"attention capture runs on SDPA: set {role}.attn_implementation=sdpa "
                                   f"(got {getattr(cfg, role).attn_implementation!r})")
        self.train_data = load_split(cfg.data, cfg.data.train_split, "train")
        self.eval_data = load_split(cfg.data, cfg.data.eval_split, "eval") if cfg.data.eval_split else None
        if not cfg.data.truncation:
            self.train_data = drop_overlong(self.train_data, cfg.data, self.tokenizer)
            if self.eval_data is not None:
                self.eval_data = drop_overlong(self.eval_data, cfg.data, self.tokenizer)
        per_step = cfg.training.micro_batch_size * world
        if len(self.train_data) < per_step:
            raise DistillError(f"the train split has {len(self.train_data)} examples, fewer than one micro-batch "
                               f"per rank ({cfg.training.micro_batch_size} x {world} ranks)")
        # Configs are resolved now (not after the models load) so a bad DeepSpeed file fails fast.
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
                               objective.build_projections(DTYPES[t.precision]), objective.project)
        # Keep the schedule in the run config: one name for it everywhere, no DeepSpeed scheduler section.
        schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
            opt, lambda s: lr_multiplier(t.lr_schedule, s, t.warmup_steps, t.max_steps, t.min_lr_ratio))
        self.student, _, _, self.scheduler = deepspeed.initialize(
            model=student, model_parameters=[p for p in student.parameters() if p.requires_grad],
            config=self.ds["student"], lr_scheduler=schedule)

        collate = (Seq2SeqCollator(self.tokenizer, cfg.data, self.student_config.decoder_start_token_id)
                   if self.student_config.is_encoder_decoder else CausalCollator(self.tokenizer, cfg.data))
        self.collate = collate
        self.stream = BatchStream(self.train_data, collate, t.micro_batch_size, self.rank, self.world, t.seed)
        if self.resume_tag is not None:
            state = checkpoint.load(self.student, self.ckpt_dir, self.resume_tag, self.rank)
            self.step = state["step"]
            self.stream.load_state_dict(state["data"])
            self.objective.load_state_dict(state["objective"])
            self.best = state.get("best")
        self._report_setup()

    def _claim_output_dir(self) -> None:
        """Before any model loads: hold the output directory, find the intact checkpoint to resume
        from, and refuse a start that would overwrite an earlier run or change what its state means."""
        t = self.cfg.training
        self._on_rank0(self._hold_output_dir)
        self.resume_tag = checkpoint.resolve_resume(self.ckpt_dir, t.resume, self.world, self.rank, self._gather,
                                                    self._say)
        if self.resume_tag is not None:
            tag_dir = self.ckpt_dir / self.resume_tag
            self.run_id = checkpoint.run_id_of(tag_dir)
            changed = resume_changes(json.loads((tag_dir / MODEL_FILES / "run_config.json").read_text()),
                                     self.cfg.to_dict())
            if changed:
                self._say(f"distill: resuming {self.resume_tag} with changed settings: {', '.join(changed)}")
        self._on_rank0(lambda: run_dir.prepare(self.out, t.resume, self.resume_tag, t.overwrite))

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

    def _forward(self, engine, batch: dict[str, torch.Tensor], features: bool = False, **extra) -> tuple[Output, Any]:
        if self.student_config.is_encoder_decoder:
            inputs = {**{k: batch[k] for k in SEQ2SEQ_INPUTS}, "use_cache": False}
        else:
            inputs = causal_model_inputs(batch)  # packed rows: position ids mark the example boundaries
        outputs, captured = engine(features=features, **inputs, **extra)
        return Output(outputs.logits, captured), outputs

    def _sync(self) -> float:
        self.accelerator.synchronize()
        return time.perf_counter()

    def train(self) -> dict[str, float]:
        t = self.cfg.training
        monitor = Monitor(self.out, self.rank, t.max_steps, self.step, self.cfg.flat())
        self.student.train()
        window = _Window()
        needs_teacher = self.objective.needs_teacher
        teacher_first = needs_teacher and not self.cfg.loss.teacher_uses_student_encoder
        while self.step < t.max_steps:
            nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)  # read with the stop request
            for micro in range(t.gradient_accumulation_steps):
                batch = {k: v.to(self.device) for k, v in next(self.stream).items()}
                gold = not is_on_policy(self.cfg.loss.on_policy_fraction, t.seed, self.step, micro)
                if not gold:
                    batch = self._sample_targets(batch)
                t0 = self._sync()
                teacher = self._teacher_forward(batch) if teacher_first else None
                t1 = self._sync()
                student, student_outputs = self._forward(self.student, batch, features=True)
                t2 = self._sync()
                if needs_teacher and not teacher_first:  # on the student's encoder output
                    encoded = BaseModelOutput(last_hidden_state=student_outputs.encoder_last_hidden_state.detach())
                    teacher = self._teacher_forward(batch, encoder_outputs=encoded)
                t3 = self._sync()
                total, terms = self.objective(batch, student, teacher, gold=gold)
                t4 = self._sync()
                nonfinite |= ~torch.isfinite(total.detach())
                self.student.backward(total)
                self.student.step()
                t5 = self._sync()
                window.add(terms, total, batch, (t1 - t0) + (t3 - t2), (t2 - t1) + (t5 - t4), t4 - t3, gold)
                if teacher is not None and self._logs_next_step():
                    window.agreement += agreement_sums(student.logits, teacher.logits,
                                                       batch["labels"] != IGNORE_INDEX).cpu()
            self.step += 1
            step_losses = window.step_losses()
            # The per-step collective only when some state needs the step's losses (TAID's λ).
            self.objective.step_end(self.step, reduce_mean(step_losses, self.device) if self.objective.tracks_losses else None)
            monitor.advance()
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                monitor.log(self.step, self._train_scalars(window))
                window = _Window()
            if t.eval_every and self.step % t.eval_every == 0 and self.step != t.max_steps:
                self._evaluation(monitor)
            stop = self._stop_agreed(nonfinite)
            if self.step % t.save_every == 0 or self.step == t.max_steps or stop:
                self._save()
            if stop:  # Slurm's warning before a time limit or preemption: the job requeues and resumes here
                monitor.close({})
                self.stopped = True
                return {}
        final = self._evaluation(monitor)
        if self.rank == 0:
            _write_json(self.out / "eval_results.json", {"step": self.step, **final})
        if t.export:
            model = self.student.module.model
            export_student(model, self.tokenizer, self.out / "final",
                           card=model_card(model.config, self.cfg.to_dict(), {"step": self.step, **final}))
        self._memory_report()
        monitor.close(final)
        return final

    def _memory_report(self) -> None:
        """Bytes each rank holds for the teacher, the student and its optimizer (``memory.json``): what
        ZeRO-3 partitioned, to check the per-rank arithmetic of BENCHMARKS.md against a real run."""
        mine = {"teacher_param_bytes": _param_bytes(self.teacher.module) if self.teacher is not None else 0,
                "student_param_bytes": _param_bytes(self.student.module),
                "optimizer_bytes": _tensor_bytes(self.student.optimizer.state_dict()),
                "peak_memory_gb": peak_memory_gb(self.device)}
        ranks: list = [None] * self.world
        dist.all_gather_object(ranks, mine)
        if self.rank == 0:
            _write_json(self.out / "memory.json", {"world_size": self.world, "precision": self.cfg.training.precision,
                                                   "per_rank": ranks})

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
        checkpoint.save(self.student, self.ckpt_dir, self.step, self._trainer_state(), self.cfg.training.keep_checkpoints,
                        self.run_id, self.rank, self.world, self._gather, dist.barrier,
                        lambda d: save_model_files(self.student.module.model, self.tokenizer, self.cfg.to_dict(),
                                                   d / MODEL_FILES))

    def _stop_agreed(self, nonfinite: torch.Tensor) -> bool:
        """Whether any rank was asked to stop, every rank getting the same answer at the same step. The
        same collective carries whether the step's loss or gradient norm was not finite (DeepSpeed skips
        the update of such a step), so divergence costs no sync of its own; a streak of
        ``training.max_nonfinite_steps`` such steps ends the run."""
        if self.cfg.training.precision != "fp16":  # fp16's loss scaler overflows routinely: only the loss counts
            norm = self.student.get_global_grad_norm()
            if norm is not None:
                nonfinite = nonfinite | ~torch.isfinite(torch.as_tensor(norm, device=self.device))
        flags = torch.stack([torch.tensor(float(self.stop.requested), device=self.device), nonfinite.float()])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, bad = flags.tolist()
        self.nonfinite_streak = self.nonfinite_streak + 1 if bad else 0
        limit = self.cfg.training.max_nonfinite_steps
        if self.nonfinite_streak:
            self._say(f"distill: step {self.step}: the loss or gradient norm is not finite; the update was skipped "
                      f"({self.nonfinite_streak} of training.max_nonfinite_steps={limit} in a row)")
        if self.nonfinite_streak >= limit:
            raise DistillError(f"training diverged: the loss or gradient norm was not finite for {self.nonfinite_streak} "
                               f"steps in a row, up to step {self.step}; the last finite checkpoint is "
                               f"{checkpoint.read_latest(self.ckpt_dir) or 'none'} (lower training.learning_rate, "
                               "or raise training.max_nonfinite_steps)")
        return bool(stop)

    @torch.no_grad()
    def _teacher_forward(self, batch: dict[str, torch.Tensor], **extra) -> Output:
        return self._forward(self.teacher, batch, features=True, **extra)[0]

    def _trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "data": self.stream.state_dict(), "objective": self.objective.state_dict(),
                "best": self.best}

    def _evaluation(self, monitor: Monitor) -> dict[str, float]:
        """Evaluate, log scalars and samples, and export the student when it is the best so far."""
        metrics, samples = self.evaluate()
        monitor.log(self.step, metrics)
        if samples:
            monitor.text("eval/samples", samples, self.step)
        name = self.cfg.eval.best_metric
        if name and name in metrics and math.isfinite(metrics[name]):
            value = metrics[name]
            lower = self.cfg.eval.lower_is_better
            if self.best is None or (value < self.best["value"] if lower else value > self.best["value"]):
                self.best = {"step": self.step, "metric": name, "value": value}
                model = self.student.module.model
                export_student(model, self.tokenizer, self.out / "best",
                               card=model_card(model.config, self.cfg.to_dict(), {"step": self.step, **metrics}))
                if self.rank == 0:
                    _write_json(self.out / "best.json", self.best)
        return metrics

    def _train_scalars(self, window: "_Window") -> dict[str, float]:
        scalars = reduce_mean(window.means(), self.device)
        if not self.objective.needs_teacher:
            scalars.pop("perf/teacher_sec_per_step")
        if self.cfg.loss.on_policy_fraction == 0:
            scalars.pop("train/on_policy_share")
        counts = torch.tensor([window.tokens], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts)
        scalars["perf/tokens_per_sec"] = counts.item() / max(window.elapsed(), 1e-9)
        for name, w in self.objective.weights().items():
            scalars[f"weight/{name}"] = w
        for name, v in self.objective.schedule_values().items():
            scalars[f"schedule/{name}"] = v
        scalars["train/lr"] = self.scheduler.get_last_lr()[0]
        norm = self.student.get_global_grad_norm()
        if norm is not None:
            scalars["train/grad_norm"] = float(norm)
        scalars["train/epoch"] = self.stream.epoch + self.stream.position / self.stream.batches_per_epoch
        scalars.update(reduce_max({"perf/peak_memory_gb": peak_memory_gb(self.device)}, self.device))
        if self.objective.needs_teacher:
            sums = window.agreement.to(self.device)
            dist.all_reduce(sums)
            agree, h_teacher, h_student, n = sums.tolist()
            if n > 0:
                scalars.update({"agreement/top1": agree / n, "agreement/teacher_entropy": h_teacher / n,
                                "agreement/student_entropy": h_student / n})
        return scalars

    def _logs_next_step(self) -> bool:
        """Whether the step in progress ends with a log line (agreement is measured on those only)."""
        t = self.cfg.training
        return (self.step + 1) % t.log_every == 0 or self.step + 1 == t.max_steps

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], str]:
        """Teacher-forced loss and token accuracy of the student on the evaluation split; with
        ``eval.generate``, ROUGE of its generations too, and a few of them as markdown."""
        if self.eval_data is None:
            return {}, ""
        self.student.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        loader = eval_loader(self.eval_data, self.collate, self.cfg.training.micro_batch_size, self.rank, self.world)
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            sums += teacher_forced_sums(self._forward(self.student, batch)[0].logits, batch["labels"],
                                        batch["weight"]).double()
        dist.all_reduce(sums)
        nll, count, correct = sums.tolist()
        metrics = {"eval/ce": nll / max(count, 1.0), "eval/token_accuracy": correct / max(count, 1.0)}
        samples = ""
        if self.cfg.eval.generate:
            scores, samples = self._generation_eval()
            metrics.update(scores)
        self.student.train()
        return metrics, samples

    def _generation_eval(self) -> tuple[dict[str, float], str]:
        """The student generates for the first ``eval.max_samples`` eval examples, each rank a shard.

        Under ZeRO-3 every forward pass gathers weights from all ranks, so generation is synchronized
        (``synced_gpus``: a rank that finished keeps stepping until all have) and every rank runs the
        same number of batches (short shards repeat their last example), so none can leave early and
        deadlock the next collective."""
        from distill.infer.evaluate import rouge
        from distill.infer.generate import GenerateSettings, generate_batch, generation_config_for

        cfg, e = self.cfg, self.cfg.eval
        data = self.eval_data.select(range(min(e.max_samples, len(self.eval_data))))
        sources, references = list(data[cfg.data.source_column]), list(data[cfg.data.target_column])
        per_rank = -(-len(data) // self.world)
        mine = list(range(self.rank * per_rank, min(len(data), (self.rank + 1) * per_rank)))
        padded = mine + [mine[-1] if mine else 0] * (per_rank - len(mine))
        model = self.student.module.model
        settings = GenerateSettings(max_source_length=cfg.data.max_source_length, source_prefix=cfg.data.source_prefix,
                                    progress=False, chat_template=cfg.data.chat_template)
        generation = generation_config_for(model, {"num_beams": e.num_beams, "max_new_tokens": e.max_new_tokens})
        synced = self._partitioned_student and self.world > 1
        predictions: list[str] = []
        step = cfg.training.micro_batch_size
        for i in range(0, per_rank, step):
            texts, _ = generate_batch(model, self.tokenizer, [sources[j] for j in padded[i:i + step]], settings,
                                      generation, self.device, synced)
            predictions += texts
        shards: list = [None] * self.world
        dist.all_gather_object(shards, list(zip(mine, predictions[:len(mine)])))
        pairs = sorted(p for shard in shards for p in shard)
        texts = [text for _, text in pairs]
        scores = rouge(texts, references, samples=200)
        metrics = {f"eval/{k}": v for k, v in scores.items() if k.startswith("rouge") and "_" not in k}
        shown = "\n\n".join(f"**source** {sources[i][:400]}\n\n**reference** {references[i]}\n\n"
                              f"**student** {texts[i]}" for i in range(min(e.text_samples, len(texts))))
        return metrics, shown


class _Window:
    """Sums over the micro-batches since the last log line."""

    def __init__(self):
        self.start = time.perf_counter()
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}  # per term: on-policy micro-batches have no CE
        self.step_sums: dict[str, float] = {}
        self.step_counts: dict[str, int] = {}
        self.n = self.steps = self.on_policy = 0
        self.tokens = 0
        self.teacher_s = self.student_s = self.loss_s = 0.0
        self.agreement = torch.zeros(4, dtype=torch.float64)  # see monitor.agreement_sums

    def add(self, terms, total, batch, teacher_s: float, student_s: float, loss_s: float, gold: bool = True) -> None:
        values = {k: v.item() for k, v in terms.items()}
        values["total"] = total.item()
        for k, v in values.items():
            for sums, counts in ((self.sums, self.counts), (self.step_sums, self.step_counts)):
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
        self.teacher_s += teacher_s
        self.student_s += student_s
        self.loss_s += loss_s
        self.n += 1
        self.on_policy += not gold
        self.tokens += int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())

    def step_losses(self) -> dict[str, float]:
        """Mean loss terms of the micro-batches of the step that just ended."""
        out = {k: v / self.step_counts[k] for k, v in self.step_sums.items()}
        self.step_sums, self.step_counts = {}, {}
        self.steps += 1
        return out

    def means(self) -> dict[str, float]:
        """Loss terms per micro-batch; seconds per optimizer step of the teacher (forward), the student
        (forward, backward, optimizer step) and the loss (features and logits into the objective)."""
        out = {f"loss/{k}": v / self.counts[k] for k, v in self.sums.items()}
        out["train/on_policy_share"] = self.on_policy / max(self.n, 1)
        out["perf/teacher_sec_per_step"] = self.teacher_s / max(self.steps, 1)
        out["perf/student_sec_per_step"] = self.student_s / max(self.steps, 1)
        out["perf/loss_sec_per_step"] = self.loss_s / max(self.steps, 1)
        return out

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _freeze(model: torch.nn.Module, embeddings: bool, encoder: bool) -> None:
    """Freeze what distilBART froze: token and position embeddings (and a tied LM head), the encoder."""
    if embeddings:
        model.get_input_embeddings().requires_grad_(False)
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("embed_tokens", "embed_positions", "shared", "wpe"):
                module.requires_grad_(False)
    if encoder:
        model.get_encoder().requires_grad_(False)


def _param_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds: its ZeRO-3 partitions, or whole tensors."""
    return sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).nbytes for p in module.parameters())


def _tensor_bytes(tree: Any) -> int:
    """Bytes of every distinct tensor in a nested state dict."""
    seen: dict[int, int] = {}

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            seen[x.data_ptr() if x.numel() else id(x)] = x.nbytes
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(tree)
    return sum(seen.values())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    checkpoint.write_atomic(path, json.dumps(data, indent=2) + "\n")
