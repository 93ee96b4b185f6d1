"""A whole distillation step, the trainer against the naive loop, 2 ranks, both models under ZeRO-3.

Same models (a 6-6 BART teacher, its 6-3 layer-copy student), data (demo documents joined into
~500-token sources), DeepSpeed configs and loss: 0.2·CE + 0.8·τ²·KL + hidden-state MSE on the decoder
(copied-from map) + MiniEnD attention KL (decoder self and cross, last layer). The trainer captures
only the mapped features with every layer on SDPA and computes the KL in chunks; the naive loop
(``naive_step.py``) runs eager attention with every hidden state and attention map returned and a
full-vocabulary ``kl_div``. Tokens per second and the per-step split average the steps after two
warm-up steps; peak memory is the maximum over ranks.

    python benchmarks/distill_step.py [--steps 12] [--micro-batch 4] [--d-model 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_section, machine  # noqa: E402


def assets(root: Path, d_model: int) -> tuple[Path, Path, Path]:
    from examples.demo.corpus import write_demo_data
    from distill.models.from_scratch import init_model
    from distill.models.make_student import make_student

    paths = write_demo_data(root / "short", seed=3, n_train=480, n_validation=8, n_test=8)
    rows = [json.loads(line) for line in (root / "short" / "train.jsonl").read_text().splitlines()]
    long = root / "data"
    long.mkdir()
    joined = [{"document": " ".join(r["document"] for r in rows[i:i + 4]), "summary": " ".join(r["summary"] for r in rows[i:i + 4])}
              for i in range(0, len(rows) - 3, 4)]
    (long / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in joined))
    (long / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in joined[:4]))
    teacher = init_model(root / "teacher", paths["tokenizer"], layers=6, d_model=d_model, ffn=4 * d_model,
                                 heads=8)
    make_student(str(teacher), str(root / "student"), decoder_layers=3)
    return teacher, root / "student", long


def launch(script: str, args: list[str]) -> subprocess.CompletedProcess:
    from distill.runtime.environment import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu"} if not _cuda() else dict(os.environ)
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, student, data = assets(root, args.d_model)
        common = [f"teacher.path={teacher}", f"student.path={student}", f"data.path={data}",
                  "data.max_source_length=512", "data.max_target_length=128", "data.max_train_samples=null",
                  f"training.micro_batch_size={args.micro_batch}", f"training.max_steps={args.steps}",
                  "training.warmup_steps=0", "training.log_every=1", "training.save_every=100000",
                  "training.export=false", "data.eval_split=null", "loss.w_ce=0.2", "loss.w_kd=0.8", "loss.w_hid=1",
                  "loss.hidden.stacks=decoder", "loss.hidden.map=copied", "loss.w_attn=1",
                  "loss.attention.sites=decoder_self,decoder_cross"]
        recipe = ["--config", str(ROOT / "recipes/demo/kd.yaml")]
        launch("launchers/run.py", [*recipe, *common, f"training.output_dir={root / 'run'}"])
        rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "perf/tokens_per_sec" in r and r["step"] > 2]
        mean = lambda key: sum(r[key] for r in steps) / len(steps)  # noqa: E731
        memory = json.loads((root / "run" / "memory.json").read_text())
        project = {"tokens_per_sec": mean("perf/tokens_per_sec"), "teacher_sec_per_step": mean("perf/teacher_sec_per_step"),
                   "student_sec_per_step": mean("perf/student_sec_per_step"),
                   "loss_sec_per_step": mean("perf/loss_sec_per_step"),
                   "peak_memory_gb": max(r["peak_memory_gb"] for r in memory["per_rank"])}
        proc = launch("benchmarks/naive_step.py", [*recipe, *common, f"training.output_dir={root / 'naive'}"])
        naive = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("NAIVE "))[6:])
    lines = ["| loop | tokens / s | teacher s/step | student s/step | loss s/step | peak memory per rank (GiB) |",
             "|---|---|---|---|---|---|"]
    for name, r in (("trainer (capture, SDPA, chunked KL)", project), ("naive (eager, all outputs, full KL)", naive)):
        lines.append(f"| {name} | {r['tokens_per_sec']:.0f} | {r['teacher_sec_per_step']:.3f} | "
                     f"{r['student_sec_per_step']:.3f} | {r['loss_sec_per_step']:.3f} | {r['peak_memory_gb']:.2f} |")
    speed = project["tokens_per_sec"] / naive["tokens_per_sec"]
    lines.append(f"\nTrainer / naive: {speed:.2f}x the tokens per second. On CPU the peak is the resident set of the "
                 "whole process, libraries and both models' shards included.")
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    append_section("Whole distillation step: trainer vs naive loop",
                   f"Machine: {machine()} (2 CPU ranks, gloo, fp32). Command: `python benchmarks/distill_step.py "
                   f"--steps {args.steps} --micro-batch {args.micro_batch} --d-model {args.d_model}`.\n"
                   "BART 6-6 teacher, 6-3 student, ~500-token sources and ~100-token targets, both ZeRO-3; loss "
                   "0.2·CE + 0.8·τ²·KL + decoder hidden MSE + decoder self/cross attention KL. Student time = "
                   "forward + backward + optimizer step; loss time = features and logits into the loss.\n\n" + table)


if __name__ == "__main__":
    main()
