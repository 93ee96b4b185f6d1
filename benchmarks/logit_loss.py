"""The logit term, chunked (the project's) against the common way, forward and backward.

* naive: ``F.kl_div(F.log_softmax(s / τ), F.softmax(t / τ), reduction="batchmean") * τ²`` over every
  token and the whole vocabulary at once, as distillation scripts write it;
* project: ``distill.losses.divergences.logit_divergence``, which takes the same logits and works through chunks
  of tokens, so the float32 probabilities exist for one chunk at a time.

Each (variant, size) runs in its own process; peak memory is the growth of the peak resident set
(CPU) or of the peak CUDA allocation (GPU) above the input logits.

    python benchmarks/logit_loss.py [--sizes 32768x4096,32768x8192,131072x2048,131072x4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_section, machine, rss_hwm  # noqa: E402
from distill.losses.divergences import logit_divergence  # noqa: E402

TAU = 2.0


def naive(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student / TAU, dim=-1), F.softmax(teacher / TAU, dim=-1),
                    reduction="batchmean") * TAU**2


def project(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return logit_divergence(student, teacher, None, "forward_kl", TAU) / student.shape[0]  # a sum: the mean, as naive


def run_one(variant: str, vocab: int, tokens: int, repeats: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    # in place: no temporary copy may raise the peak before it is measured
    student = torch.randn(tokens, vocab, device=device, dtype=dtype).mul_(2).requires_grad_()
    teacher = torch.randn(tokens, vocab, device=device, dtype=dtype).mul_(2)
    fn = naive if variant == "naive" else project
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_hwm()
    times, loss = [], None
    for _ in range(repeats + 1):  # the first run warms up
        student.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = fn(student, teacher)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_hwm()) - base
    return {"seconds": min(times[1:]), "peak_bytes": peak, "loss": float(loss), "device": device.type,
            "dtype": str(dtype).replace("torch.", "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="32768x4096,32768x8192,131072x2048,131072x4096", help="VOCABxTOKENS,...")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=["naive", "project"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    if args.variant:
        (vocab, tokens), = sizes
        print(json.dumps(run_one(args.variant, vocab, tokens, args.repeats)))
        return
    rows = ["| V | tokens | variant | s (fwd+bwd) | peak memory (MiB) | loss | time ratio | memory ratio |",
            "|---|---|---|---|---|---|---|---|"]
    device = None
    for vocab, tokens in sizes:
        r = {}
        for variant in ("naive", "project"):
            out = subprocess.run([sys.executable, __file__, f"--sizes={vocab}x{tokens}", f"--repeats={args.repeats}",
                                  f"--variant={variant}"], capture_output=True, text=True)
            if out.returncode == -9:  # the kernel's out-of-memory killer
                r[variant] = None
                continue
            if out.returncode != 0:
                raise SystemExit(out.stderr[-2000:])
            r[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            device = r[variant]["device"], r[variant]["dtype"]
        for variant in ("naive", "project"):
            x, base = r[variant], r["naive"]
            if x is None:
                rows.append(f"| {vocab} | {tokens} | {variant} | killed: out of memory | | | | |")
                continue
            t_ratio = f"{x['seconds'] / base['seconds']:.2f}" if base else "-"
            m_ratio = f"{x['peak_bytes'] / max(base['peak_bytes'], 1):.2f}" if base else "-"
            rows.append(f"| {vocab} | {tokens} | {variant} | {x['seconds']:.3f} | {x['peak_bytes'] / 2**20:.0f} | "
                        f"{x['loss']:.6f} | {t_ratio} | {m_ratio} |")
    table = "\n".join(rows)
    print(table)
    if args.no_write:
        return
    command = f"python benchmarks/logit_loss.py --sizes={args.sizes} --repeats={args.repeats}"
    append_section("Logit loss: chunked vs naive full-vocabulary KL",
                   f"Machine: {machine(device[0])} ({device[0]}, {device[1]} logits). Command: `{command}`.\n"
                   "Forward KL at τ = 2, forward and backward, fastest of the repeats; peak memory is the growth "
                   "above the two input logit tensors. Ratios are project / naive in the same run; both losses "
                   "agree.\n\n" + table)


if __name__ == "__main__":
    main()
