"""The offline demo, end to end, with the same commands a user runs by hand.

1. generate a summarization corpus and train its tokenizer; write a random-init 4-4 BART;
2. train that teacher with ``deepspeed launchers/run.py`` (plain fine-tuning, ZeRO-2);
3. ``distill make-student``: a 4-2 student copied from the teacher's layers (first and last decoder layer);
4. distill it with teacher and student both under ZeRO-3 (KD);
5. ``distill cache-teacher``: the teacher's top-64 logits of the student's training set, then the same KD
   from that cache, with no teacher model loaded;
6. train the same student on gold summaries only (the CE-only baseline);
7. compare them on the validation split.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from distill.errors import DistillError
from distill.runtime.environment import free_port

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "launchers" / "run.py"
CLI = ROOT / "launchers" / "distill_cli.py"
CACHE_TOP_K = 64
RECIPES = ROOT / "recipes" / "demo"
TEACHER_LAYERS, STUDENT_DECODER_LAYERS = 4, 2


def launch_command(recipe: Path, overrides: list[str], nproc: int) -> list[str]:
    """``deepspeed --num_gpus N launchers/run.py --config RECIPE key=value ...`` on a free port."""
    return _deepspeed(LAUNCHER, ["--config", str(recipe), *overrides], nproc)


def _deepspeed(script: Path, args: list[str], nproc: int) -> list[str]:
    deepspeed = Path(sys.executable).with_name("deepspeed")
    return [str(deepspeed), "--num_gpus", str(nproc), "--master_port", str(free_port()), str(script), *args]


def launch_env() -> dict[str, str]:
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _run(cmd: list[str], title: str) -> None:
    print(f"\n== {title}\n$ {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, env=launch_env()).returncode != 0:
        raise DistillError(f"demo step failed: {title}")


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval_results.json").read_text())


def run_demo(workdir: str | Path, nproc: int = 2) -> dict:
    from examples.demo.corpus import write_demo_data
    from distill.models.from_scratch import init_model
    from distill.models.make_student import format_layer_map, make_student

    for needed in (LAUNCHER, RECIPES):
        if not needed.exists():
            raise DistillError(f"{needed} not found: run the demo from a checkout of the repository")
    w = Path(workdir).resolve()
    start = time.time()
    print(f"== 1. demo corpus, tokenizer and a random-init teacher in {w}", flush=True)
    paths = write_demo_data(w / "data")
    init_model(w / "teacher-init", paths["tokenizer"], layers=TEACHER_LAYERS, d_model=128, ffn=256, heads=4)

    data = f"data.path={w / 'data'}"
    _run(launch_command(RECIPES / "teacher.yaml",
                        [f"student.path={w / 'teacher-init'}", data, f"training.output_dir={w / 'teacher'}"], nproc),
         "2. train the teacher (fine-tuning, ZeRO-2)")

    print("\n== 3. make the student: the teacher's encoder, half of its decoder layers", flush=True)
    print(f"$ distill make-student {w / 'teacher' / 'final'} {w / 'student-init'} "
          f"--decoder-layers {STUDENT_DECODER_LAYERS}", flush=True)
    info = make_student(str(w / "teacher" / "final"), str(w / "student-init"), decoder_layers=STUDENT_DECODER_LAYERS)
    print(format_layer_map(info), flush=True)

    pair = [f"teacher.path={w / 'teacher' / 'final'}", f"student.path={w / 'student-init'}", data]
    _run(launch_command(RECIPES / "kd.yaml", [*pair, f"training.output_dir={w / 'kd'}"], nproc),
         "4. distill: teacher and student both under ZeRO-3")
    cache = w / "teacher-cache"
    _run(_deepspeed(CLI, ["cache-teacher", "--model", str(w / "teacher" / "final"), "--data", str(w / "data"),
                          "--config", str(RECIPES / "kd.yaml"), "--top-k", str(CACHE_TOP_K), "--out", str(cache),
                          "--ds-config", str(ROOT / "ds_configs" / "teacher_zero3.json")], nproc),
         f"5a. cache the teacher's top-{CACHE_TOP_K} logits of the student's training set (ZeRO-3)")
    _run(launch_command(RECIPES / "kd.yaml", [*pair[1:], "teacher.path=", f"teacher.cache={cache}",
                                              f"training.output_dir={w / 'kd-cached'}"], nproc),
         "5b. distill from the cache: no teacher model loaded")
    _run(launch_command(RECIPES / "baseline.yaml", [*pair[1:], f"training.output_dir={w / 'baseline'}"], nproc),
         "6. baseline: the same student on gold summaries only")

    t, s = TEACHER_LAYERS, STUDENT_DECODER_LAYERS
    rows = {f"teacher {t}-{t} (fine-tuned)": _results(w / "teacher"),
            f"student {t}-{s}, distilled (KD)": _results(w / "kd"),
            f"student {t}-{s}, KD from a top-{CACHE_TOP_K} cache": _results(w / "kd-cached"),
            f"student {t}-{s}, CE-only baseline": _results(w / "baseline")}
    print(f"\n== 7. results on the validation split (gold summaries, teacher-forced), "
          f"after {time.time() - start:.0f} s")
    print(f"{'model':40s} {'eval CE':>9s} {'token acc':>10s}")
    for name, r in rows.items():
        print(f"{name:40s} {r['eval/ce']:9.4f} {r['eval/token_accuracy']:10.4f}")
    kd, cached, base = (r["eval/ce"] for r in list(rows.values())[1:])
    for what, value in (("distilled student's", kd), ("student distilled from the cache's", cached)):
        print(f"The {what} loss is {'lower' if value < base else 'not lower'} than the baseline's "
              f"({value:.4f} vs {base:.4f}).")
    print(f"TensorBoard:  tensorboard --logdir {w}")
    print(f"Checkpoints:  {w / 'kd' / 'checkpoints'}  (DeepSpeed ZeRO-3, resumable)")
    print(f"Student:      {w / 'kd' / 'final'}  (Hugging Face directory)")
    return rows
