"""The teacher cache against the online teacher, on 2 CPU ranks (gloo), every model under ZeRO-3, with the
project's own commands (``distill cache-teacher`` and ``launchers/run.py``):

* size: bytes per target token of the caches at each K (``--ks``), from their index;
* the cache pass: teacher forwards (examples) per second per rank;
* the KD step (``recipes/demo/kd.yaml``: 0.2·CE + 0.8·τ²·KL): seconds per step (wall clock) and peak memory
  per rank, online and from the cache, with a random-init BART teacher (6-6, d_model 512) about 8× its
  student (3-3, d_model 256): the models' quality plays no part in the speed;
* quality (``--demo``, the work directory of a finished ``distill demo``): validation CE of the demo's KD
  recipe from a cache of its trained teacher at each K, beside the demo's own online KD and CE-only runs.

    python benchmarks/teacher_cache.py [--ks 16,64,128] [--examples 512] [--steps 12] [--demo runs/demo]
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

KD = ROOT / "recipes/demo/kd.yaml"
ZERO3 = ROOT / "ds_configs/teacher_zero3.json"


def _deepspeed(script: str, args: list) -> str:
    from distill.runtime.environment import free_port

    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / script), *map(str, args)]
    proc = subprocess.run(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc.stdout


def speed_assets(root: Path, examples: int) -> tuple[Path, Path, Path]:
    from examples.demo.corpus import write_demo_data
    from distill.models.from_scratch import init_model
    from distill.models.make_student import make_student

    data, teacher, student = root / "data", root / "teacher", root / "student"
    if not data.exists():
        write_demo_data(data, seed=5, n_train=examples, n_validation=8, n_test=8)
        init_model(teacher, data / "tokenizer", layers=6, d_model=512, ffn=2048, heads=8)
        make_student(str(teacher), str(student), encoder_layers=3, decoder_layers=3, hidden_size=256, num_heads=4,
                     ffn_size=1024)
    return data, teacher, student


def params(path: Path) -> int:
    from transformers import AutoModelForSeq2SeqLM

    return sum(p.numel() for p in AutoModelForSeq2SeqLM.from_pretrained(path).parameters())


def cache(teacher: Path, data: Path, out: Path, k: int, examples: int) -> dict:
    stdout = _deepspeed("launchers/distill_cli.py", [
        "cache-teacher", "--model", teacher, "--data", data, "--config", KD, "--top-k", k, "--out", out,
        "--ds-config", ZERO3, "--batch-size", 16, f"data.max_train_samples={examples}"])
    return json.JSONDecoder().raw_decode(stdout, stdout.index("{\n"))[0]  # the command's summary


def train(recipe: Path, overrides: list, out: Path) -> dict:
    _deepspeed("launchers/run.py", ["--config", recipe, *overrides, f"training.output_dir={out}"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "perf/sec_per_step" in r and r["step"] > 2]  # the first steps warm up
    memory = json.loads((out / "memory.json").read_text())
    evals = [r for r in rows if "eval/ce" in r]
    return {"sec_per_step": sum(r["perf/sec_per_step"] for r in steps) / max(len(steps), 1),
            "peak_gb": max(r["peak_memory_gb"] for r in memory["per_rank"]),
            "eval_ce": evals[-1]["eval/ce"] if evals else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default="16,64,128")
    parser.add_argument("--examples", type=int, default=512, help="training examples of the speed part")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--demo", type=Path, help="a finished demo's work directory (distill demo --workdir)")
    parser.add_argument("--workdir", type=Path, help="keep the models, caches and runs here (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        data, teacher, student = speed_assets(root, args.examples)
        caches = {k: cache(teacher, data, root / f"cache-{k}", k, args.examples) for k in ks}
        mid = ks[len(ks) // 2]
        common = [f"student.path={student}", f"data.path={data}", f"data.max_train_samples={args.examples}",
                  "data.eval_split=null", f"training.max_steps={args.steps}", "training.warmup_steps=0",
                  "training.log_every=1", "training.eval_every=0", "training.save_every=100000",
                  "training.export=false", "eval.generate=false"]
        online = train(KD, [f"teacher.path={teacher}", *common], root / "online")
        cached = train(KD, ["teacher.path=", f"teacher.cache={root / f'cache-{mid}'}", *common], root / "cached")
        lines = [f"Teacher {params(teacher) / 1e6:.1f}M params (BART 6-6, d_model 512), student "
                 f"{params(student) / 1e6:.1f}M (3-3, d_model 256), random init; {args.examples} demo examples "
                 "(~100-word documents, one-sentence summaries), micro-batch 16 per rank, 2 ranks.", "",
                 "| K | bytes per target token | cache pass: examples (teacher forwards) / s per rank | target tokens "
                 "| cache size (MiB) |",
                 "|---|---|---|---|---|"]
        for k, c in caches.items():
            lines.append(f"| {k} | {c['bytes'] / c['target_rows']:.1f} | {c['examples_per_second_per_rank']:.1f} | "
                         f"{c['target_rows']} | {c['bytes'] / 2**20:.2f} |")
        lines += ["", "| KD step | s / step | peak per rank (GiB) | vs online |", "|---|---|---|---|",
                  f"| online teacher | {online['sec_per_step']:.3f} | {online['peak_gb']:.2f} | 1.00 |",
                  f"| from the top-{mid} cache | {cached['sec_per_step']:.3f} | {cached['peak_gb']:.2f} | "
                  f"{cached['sec_per_step'] / online['sec_per_step']:.2f} |"]
        if args.demo:
            demo = args.demo.resolve()
            teacher_dir, pair = demo / "teacher" / "final", [f"student.path={demo / 'student-init'}",
                                                             f"data.path={demo / 'data'}"]
            final = lambda run: json.loads((run / "eval_results.json").read_text())["eval/ce"]  # noqa: E731
            runs = {"online KD (the demo's)": final(demo / "kd")}
            for k in ks:
                cache(teacher_dir, demo / "data", root / f"q-cache-{k}", k, 256)
                runs[f"KD from the top-{k} cache"] = train(KD, ["teacher.path=", f"teacher.cache={root / f'q-cache-{k}'}",
                                                                *pair], root / f"q-cached-{k}")["eval_ce"]
            runs["CE-only baseline (the demo's)"] = final(demo / "baseline")
            runs["teacher (the demo's)"] = final(demo / "teacher")
            ref = runs["online KD (the demo's)"]
            lines += ["", "Quality: the demo's KD recipe (`recipes/demo/kd.yaml`: τ = 2, 256 examples, 80 steps) with its "
                          "trained 4-4 teacher and 4-2 student, validation CE at the end.", "",
                      "| model | eval CE | vs online KD |", "|---|---|---|"]
            lines += [f"| {name} | {value:.4f} | {value - ref:+.4f} |" for name, value in runs.items()]
        table = "\n".join(lines)
        print(table)
        if not args.no_write:
            command = "python benchmarks/teacher_cache.py " + " ".join(sys.argv[1:])
            append_section("Teacher cache: size, cache pass, cached vs online KD step",
                           f"Machine: {machine()}, fp32, gloo. Command: `{command}`.\n\n{table}")


if __name__ == "__main__":
    main()
