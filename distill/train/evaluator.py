"""Evaluation during training: teacher-forced loss and accuracy, generation with ROUGE, and the export
of the best student so far. Every rank takes part (ZeRO-3 forwards gather weights from all of them)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from distill.config.settings import RunConfig
from distill.data.stream import eval_loader
from distill.files import write_atomic
from distill.infer.export import export_student, model_card
from distill.losses.metrics import teacher_forced_sums


class Evaluator:
    def __init__(self, cfg: RunConfig, student, tokenizer, eval_data, collate, forward: Callable, device: torch.device,
                 out: Path, partitioned: bool):
        self.cfg, self.student, self.tokenizer, self.eval_data = cfg, student, tokenizer, eval_data
        self.collate, self.forward, self.device, self.out, self.partitioned = collate, forward, device, out, partitioned
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def run(self, step: int, best: Optional[dict[str, Any]]) -> tuple[dict[str, float], str, Optional[dict[str, Any]]]:
        """(metrics, markdown samples, best record); exports the student to ``best/`` when it is the best
        so far by ``eval.best_metric`` (a value that is not finite never is)."""
        metrics, samples = self.evaluate()
        name = self.cfg.eval.best_metric
        if name and name in metrics and math.isfinite(metrics[name]):
            value = metrics[name]
            lower = self.cfg.eval.lower_is_better
            if best is None or (value < best["value"] if lower else value > best["value"]):
                best = {"step": step, "metric": name, "value": value}
                model = self.student.module.model
                export_student(model, self.tokenizer, self.out / "best",
                               card=model_card(model.config, self.cfg.to_dict(), {"step": step, **metrics}))
                if self.rank == 0:
                    write_atomic(self.out / "best.json", json.dumps(best, indent=2) + "\n")
        return metrics, samples, best

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
            labels = batch["labels"].reshape(-1).index_select(0, batch["target_index"])
            weight = batch["weight"][:, None].expand(batch["labels"].shape).reshape(-1).index_select(0, batch["target_index"])
            # inside the student's forward, where ZeRO-3 gathers the head for it (Head.call)
            sums += self.forward(self.student, batch, lambda out: teacher_forced_sums(
                out, labels, weight.float(), self.cfg.loss.logit_chunk_mib))
        dist.all_reduce(sums)
        nll, count, correct = sums.tolist()
        metrics = {"eval/ce": nll / max(count, 1.0), "eval/token_accuracy": correct / max(count, 1.0)}
        samples = ""
        if self.cfg.eval.generate:
            scores, samples = self._generation()
            metrics.update(scores)
        self.student.train()
        return metrics, samples

    def _generation(self) -> tuple[dict[str, float], str]:
        """The student generates for the first ``eval.max_samples`` eval examples, each rank a shard.

        Under ZeRO-3 every forward pass gathers weights from all ranks, so generation is synchronized
        (``synced_gpus``: a rank that finished keeps stepping until all have) and every rank runs the
        same number of batches (short shards repeat their last example), so none can leave early and
        deadlock the next collective."""
        from distill.infer.evaluate import rouge
        from distill.infer.generate import generate_batch, generation_config_for
        from distill.infer.inputs import GenerateSettings

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
        synced = self.partitioned and self.world > 1
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
