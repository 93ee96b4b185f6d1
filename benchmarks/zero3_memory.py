"""ZeRO-3 memory per rank on paper, and the same arithmetic checked against a real 2-rank run.

Per rank, with P parameters partitioned over W ranks (bf16 training, Adam):
  teacher            2·P_T / W        bf16 weights, nothing else (frozen, no optimizer)
  student weights    2·P_S / W        bf16
  student gradients  2·P_S / W        bf16, reduce-scattered to their partition
  master + Adam     12·P_S / W        fp32 master weights, first and second moments
plus the working set of gathered layers (the largest layer of each model, gathered in bf16, twice
for prefetch) and activations (not counted: they depend on batch and sequence length).
Parameter counts come from the real model classes built from each config on the meta device.

The check runs the trainer on 2 CPU ranks (fp32: 4-byte weights, 4-byte gradients, and DeepSpeed's
fp32 partition plus Adam's moments) and compares each rank's measured bytes (``memory.json``) with
the same formula at that world size and precision.

    python benchmarks/zero3_memory.py [--no-check]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2**30

from benchmarks.common import append_section  # noqa: E402


def _count(config) -> tuple[int, int]:
    """(parameters, largest single layer's parameters) of the model of ``config``."""
    from distill.models.loading import model_class
    from distill.models.architectures import layer_stacks

    with torch.device("meta"):
        model = model_class(config)(config)
    total = sum(p.numel() for p in model.parameters())
    layers = [sum(p.numel() for p in layer.parameters()) for _, stack in layer_stacks(model).values() for layer in stack]
    embed = model.get_input_embeddings().weight.numel()
    return total, max(layers + [embed])


def pairs():
    from transformers import BartConfig, LlamaConfig, T5Config

    bart = dict(vocab_size=50264, d_model=1024, encoder_attention_heads=16, decoder_attention_heads=16,
                encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024)
    t5_3b = T5Config(vocab_size=32128, d_model=1024, d_kv=128, d_ff=16384, num_layers=24, num_heads=32)
    t5_small = T5Config(vocab_size=32128, d_model=384, d_kv=32, d_ff=1536, num_layers=6, num_heads=12)
    llama = dict(vocab_size=128256, num_attention_heads=32, num_key_value_heads=8)
    return {
        "BART-large 12-12 -> 12-6": (BartConfig(encoder_layers=12, decoder_layers=12, **bart),
                                     BartConfig(encoder_layers=12, decoder_layers=6, **bart)),
        "T5-3B -> 6L/384H": (t5_3b, t5_small),
        "8B decoder -> 1B": (LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, **llama),
                             LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                         tie_word_embeddings=True, head_dim=64, **llama)),
    }


def per_rank(p_teacher: int, p_student: int, world: int, weight_bytes: int, master_bytes: int) -> dict[str, float]:
    """Bytes per rank of each partitioned part (see the module docstring)."""
    return {"teacher": weight_bytes * p_teacher / world, "student weights": weight_bytes * p_student / world,
            "student gradients": weight_bytes * p_student / world,
            "master + Adam": (master_bytes + 8) * p_student / world}


def paper_table() -> str:
    lines = ["| teacher -> student | params (teacher / student) | GPUs | teacher | student weights + grads | "
             "master + Adam | working set | total per GPU |", "|---|---|---|---|---|---|---|---|"]
    for name, (t_cfg, s_cfg) in pairs().items():
        (p_t, big_t), (p_s, big_s) = _count(t_cfg), _count(s_cfg)
        working = 2 * 2 * (big_t + big_s)  # bf16, current layer + one prefetched, each model
        for world in (8, 16, 64):
            parts = per_rank(p_t, p_s, world, 2, 4)
            total = sum(parts.values()) + working
            lines.append(f"| {name} | {p_t / 1e9:.2f}B / {p_s / 1e9:.2f}B | {world} | {parts['teacher'] / GIB:.2f} | "
                         f"{(parts['student weights'] + parts['student gradients']) / GIB:.2f} | "
                         f"{parts['master + Adam'] / GIB:.2f} | {working / GIB:.2f} | {total / GIB:.2f} GiB |")
    return "\n".join(lines)


def check() -> str:
    """Run the trainer on 2 CPU ranks and compare measured bytes with the formula."""
    from examples.demo.corpus import write_demo_data
    from distill.models.from_scratch import init_model
    from distill.models.make_student import make_student

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_demo_data(root / "data", seed=1, n_train=64, n_validation=8, n_test=8)
        teacher = init_model(root / "teacher", data["tokenizer"], layers=4, d_model=256, ffn=1024, heads=4)
        make_student(str(teacher), str(root / "student"), decoder_layers=2)
        env = {**os.environ, "DS_ACCELERATOR": "cpu"}
        from distill.runtime.environment import free_port

        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
               str(ROOT / "launchers/run.py"), "--config", str(ROOT / "recipes/demo/kd.yaml"), f"teacher.path={teacher}",
               f"student.path={root / 'student'}", f"data.path={root / 'data'}", f"training.output_dir={root / 'run'}",
               "training.max_steps=2", "training.micro_batch_size=4", "training.warmup_steps=0", "training.export=false",
               "data.max_train_samples=null"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
        memory = json.loads((root / "run" / "memory.json").read_text())
        info = json.loads((root / "run" / "run_info.json").read_text())
    p_t, p_s, world = info["teacher"]["params"], info["student"]["params"], memory["world_size"]
    predicted = per_rank(p_t, p_s, world, 4, 4)  # fp32 run
    lines = ["| rank | teacher weights: measured / formula | student weights | optimizer (fp32 partition + Adam) |",
             "|---|---|---|---|"]
    for rank, m in enumerate(memory["per_rank"]):
        lines.append(f"| {rank} | {m['teacher_param_bytes'] / 2**20:.2f} / {predicted['teacher'] / 2**20:.2f} MiB | "
                     f"{m['student_param_bytes'] / 2**20:.2f} / {predicted['student weights'] / 2**20:.2f} MiB | "
                     f"{m['optimizer_bytes'] / 2**20:.2f} / {predicted['master + Adam'] / 2**20:.2f} MiB |")
    return (f"Check: demo-shaped teacher ({p_t / 1e6:.2f}M) and student ({p_s / 1e6:.2f}M), fp32, 2 CPU ranks, "
            "2 steps; measured bytes from each rank's `memory.json`.\n\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-check", action="store_true", help="the table on paper only")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    text = paper_table()
    if not args.no_check:
        text += "\n\n" + check()
    print(text)
    if not args.no_write:
        append_section("ZeRO-3 memory per rank, on paper",
                       "Command: `python benchmarks/zero3_memory.py`. bf16 weights and gradients, fp32 master weights "
                       "and Adam moments, all partitioned over the GPUs; the working set is the largest layer of each "
                       "model gathered in bf16, current and prefetched. Activations are not counted.\n\n" + text)


if __name__ == "__main__":
    main()
