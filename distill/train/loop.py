"""The distillation trainer's loop: a frozen ZeRO-3 teacher and a trainable student on the same ranks
(set up by ``run_setup.RunSetup``), stepped by ``step.train_step``: step, log, evaluate, save, stop.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from distill.files import write_atomic
from distill.infer.export import MODEL_FILES, export_student, model_card, save_model_files
from distill.train import checkpoint, run_dir
from distill.train.monitor import Monitor, memory_report, peak_memory_gb, reduce_max
from distill.train.on_policy import is_on_policy, sample_batch, sampling_config
from distill.train.run_setup import RunSetup
from distill.train.step import train_step
from distill.train.timing import PhaseTimer
from distill.train.window import Window


class Trainer(RunSetup):
    """A set-up run's steps, from its state to ``training.max_steps``, a stop request or early stopping."""

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
            run_dir.write_json(self.out / "eval_results.json", {"step": state.step, **final})
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
        write_atomic(tag_dir / checkpoint.DATA_RECORD, json.dumps(self.data_identity) + "\n")

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
        phases = ("teacher", "student", "loss") if self.objective.needs_teacher else ("student", "loss")
        scalars = window.scalars(self._all_reduce, timer, phases, self.device)
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
        scalars.update(window.agreement_scalars(self._all_reduce))
        return scalars
