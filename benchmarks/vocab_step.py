"""The whole KD step with a large-vocabulary decoder-only pair: ``recipes/llama_kd.yaml`` on 2 ranks,
both models under ZeRO-3, at several vocabulary sizes, with this checkout and with another one (the
code before the fused LM head, e.g. a ``git worktree`` of an older commit) side by side.

LLaMA-shaped teacher (4 layers) and student (2 layers), hidden size --hidden, untied heads, the demo
tokenizer with the embedding matrices padded to the vocabulary size (as Llama-3's 128,256 rows). What
grows with the vocabulary besides the logits is weight-sized: the partitions each rank holds (both
models' embeddings and heads, the student's fp32 master copy, gradients and Adam moments: measured, from
``memory.json``) and the few whole V × hidden matrices of a step (the heads gathered for the loss and
the student head's gradient before it is reduce-scattered). Points are VOCABxMICRO_BATCH: more tokens
per step at the same vocabulary show what grows with tokens × vocabulary.

Peak memory per rank is the steps' peak (loading excluded) where the code measures it so (this
checkout); older code reports its peak since the start, loading included.

    git worktree add /tmp/before <commit>
    python benchmarks/vocab_step.py --before /tmp/before [--points 32768x4,131072x4,131072x8] [--steps 6]
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


def assets(root: Path, vocab: int, hidden: int) -> tuple[Path, Path, Path]:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from examples.demo.corpus import write_demo_data

    data = root / "data"
    if not data.exists():
        write_demo_data(data, seed=3, n_train=256, n_validation=8, n_test=8)
    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    paths = []
    for name, layers in (("teacher", 4), ("student", 2)):
        out = root / f"{name}-{vocab}"
        if not out.exists():
            config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                 num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                 tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
            LlamaForCausalLM(config).save_pretrained(out)
            tokenizer.save_pretrained(out)
        paths.append(out)
    return paths[0], paths[1], data


def run(source: Path, teacher: Path, student: Path, data: Path, out: Path, micro_batch: int, args) -> dict:
    from distill.runtime.environment import free_port

    overrides = [f"teacher.path={teacher}", f"student.path={student}", f"data.path={data}", "data.train_split=train",
                 "data.eval_split=null", "data.source_column=document", "data.target_column=summary",
                 "data.chat_template=false", "data.max_source_length=256", "data.max_target_length=128",
                 "training.precision=fp32", f"training.micro_batch_size={micro_batch}",
                 "training.gradient_accumulation_steps=1", f"training.max_steps={args.steps}",
                 "training.warmup_steps=0", "training.log_every=1", "training.save_every=100000",
                 "training.eval_every=0", "training.export=false", f"training.output_dir={out}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(source)}  # that checkout's distill
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
           str(source / "launchers/run.py"), "--config", str(source / "recipes/llama_kd.yaml"), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=source)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "perf/tokens_per_sec" in r and r["step"] > 2]
    memory = json.loads((out / "memory.json").read_text())
    held = max(r["teacher_param_bytes"] + r["student_param_bytes"] + r["optimizer_bytes"] for r in memory["per_rank"])
    return {"tokens_per_sec": sum(r["perf/tokens_per_sec"] for r in steps) / len(steps),
            "peak_memory_gb": max(r["peak_memory_gb"] for r in memory["per_rank"]), "held_gb": held / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the code to compare with")
    parser.add_argument("--points", default="32768x4,131072x4,131072x8", help="VOCABxMICRO_BATCH,...")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    points = [tuple(map(int, p.split("x"))) for p in args.points.split(",")]
    results: dict[tuple[str, int, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for vocab, micro in points:
            teacher, student, data = assets(root, vocab, args.hidden)
            for name, source in (("before", args.before.resolve()), ("fused", ROOT)):
                results[(name, vocab, micro)] = run(source, teacher, student, data, root / f"{name}-{vocab}-{micro}",
                                                    micro, args)
                print(name, vocab, micro, results[(name, vocab, micro)], flush=True)
    matrix = lambda vocab: vocab * args.hidden * 4 / 2**30  # noqa: E731  one V x hidden fp32 matrix
    lines = ["| code | vocabulary | micro-batch | tokens / s | peak per rank (GiB) | peak growth | held weights growth "
             "(measured) | one V x hidden matrix growth |", "|---|---|---|---|---|---|---|---|"]
    for name in ("before", "fused"):
        first = results[(name, *points[0])]
        for vocab, micro in points:
            r = results[(name, vocab, micro)]
            lines.append(f"| {name} | {vocab} | {micro} | {r['tokens_per_sec']:.0f} | {r['peak_memory_gb']:.2f} | "
                         f"{r['peak_memory_gb'] - first['peak_memory_gb']:+.2f} | {r['held_gb'] - first['held_gb']:+.2f} | "
                         f"{matrix(vocab) - matrix(points[0][0]):+.3f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        append_section("Whole KD step, large vocabularies: before and after the fused LM head",
                       f"Machine: {machine()} (2 CPU ranks, gloo, fp32). Command: `python benchmarks/vocab_step.py "
                       f"--before <checkout> --points {args.points} --hidden {args.hidden} --steps {args.steps}`. "
                       f"`recipes/llama_kd.yaml` (0.5·CE + 0.5·KL) with a LLaMA 4-layer teacher and 2-layer student, "
                       f"hidden {args.hidden}, untied heads, ~256-token prompts and ~100-token targets; tokens/s "
                       "averages the steps after two. On CPU the peak is the process' resident set; growths are from "
                       "the first point.\n\n" + table)


if __name__ == "__main__":
    main()
