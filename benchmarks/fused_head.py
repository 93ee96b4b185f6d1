"""The logit loss from hidden states, three ways, forward and backward: the KD term (forward KL at τ = 2)
of a student and a teacher head over the same vocabulary, N target rows of hidden size D.

* fused: ``distill.losses.fused_head.head_pass`` (no tensor of rows × vocabulary);
* chunked: the path before it, kept here as the baseline: both models' full logits (``h @ Wᵀ``), then
  the divergence's float32 arithmetic a chunk of rows at a time into one gradient buffer of the logits'
  shape;
* naive: ``F.kl_div(F.log_softmax(s / τ), F.softmax(t / τ))`` over the full logits, as scripts write it.

Peak memory is the working memory above the inputs (both models' hidden rows and head weights): it
includes both models' logits, every intermediate, and the gradients of the student's rows and head.

* ``--mode memory``: every grid point and variant under ``FakeTensorMode`` with PyTorch's ``MemTracker``,
  which allocates and frees each tensor's storage as a real run would, without the arithmetic; so the
  whole grid is covered, even points whose naive run needs more memory than the machine has. Besides
  the peak it gives the loss's own memory: the peak without the gradients of the student's rows and
  head that every method returns (the head's weight gradient, V × D, is a floor no method avoids);
* ``--mode time``: real runs, each variant in its own process, fastest of ``--repeats`` after a warm-up;
  peak from CUDA's allocator, or the growth of the process' peak resident set on CPU;
* ``--budget-sweep``: the fused pass's time at several ``loss.logit_chunk_mib`` budgets (its default is
  chosen from this).

    python benchmarks/fused_head.py --mode memory --sizes 32768x4096x2048,131072x16384x4096
    python benchmarks/fused_head.py --mode time --sizes 32768x4096x2048 [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_section, machine, rss_hwm  # noqa: E402
from distill.losses.divergences import scaled_divergence  # noqa: E402
from distill.losses.fused_head import RowSum, Side, chunk_budget, head_pass  # noqa: E402
from distill.models.lm_head import Head  # noqa: E402

TAU = 2.0
METHODS = ("fused", "chunked", "naive")
GRID = [f"{v}x{n}x{d}" for v in (32768, 131072, 152064) for n in (4096, 16384) for d in (2048, 4096)]


class _ChunkedLogits(torch.autograd.Function):
    """The materialized-logits chunked path: the divergence over full logits a chunk of rows at a time,
    each chunk's gradient written into one buffer of the logits' shape (see the module docstring)."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, chunk: int) -> Tensor:
        grad = torch.zeros_like(student)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, student.shape[0], chunk):
            s = student[start:start + chunk].float().requires_grad_()
            with torch.enable_grad():
                value = scaled_divergence(s, teacher[start:start + chunk].float(), "forward_kl", TAU).sum()
            grad[start:start + chunk] = torch.autograd.grad(value, s)[0].to(grad.dtype)
            total += value.detach()
        ctx.grad = grad
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None
        return grad.mul_(grad_output.to(grad.dtype)), None, None


def loss_fn(method: str, budget_mib: float) -> Callable[[Tensor, nn.Linear, Tensor, nn.Linear], Tensor]:
    def fused(h_s, w_s, h_t, w_t):
        item = RowSum(lambda s, t, rows: scaled_divergence(s, t, "forward_kl", TAU), 1.0)
        return head_pass(Side(h_s, Head(w_s)), Side(h_t, Head(w_t)), [item], budget_mib)[0]

    def chunked(h_s, w_s, h_t, w_t):
        vocab = w_s.weight.shape[0]
        return _ChunkedLogits.apply(F.linear(h_s, w_s.weight), F.linear(h_t, w_t.weight), max(1, (1 << 20) // vocab))

    def naive(h_s, w_s, h_t, w_t):
        s, t = F.linear(h_s, w_s.weight), F.linear(h_t, w_t.weight)
        return F.kl_div(F.log_softmax(s.float() / TAU, -1), F.softmax(t.float() / TAU, -1), reduction="sum") * TAU**2

    return {"fused": fused, "chunked": chunked, "naive": naive}[method]


def inputs(vocab: int, tokens: int, width: int, dtype: torch.dtype, device: str):
    torch.manual_seed(0)
    w_s, w_t = (nn.Linear(width, vocab, bias=False, dtype=dtype, device=device) for _ in range(2))
    w_t.weight.requires_grad_(False)
    h_s = torch.randn(tokens, width, dtype=dtype, device=device).requires_grad_()
    h_t = torch.randn(tokens, width, dtype=dtype, device=device)
    return h_s, w_s, h_t, w_t


def memory(method: str, size: str, dtype: torch.dtype, budget_mib: float) -> dict:
    """Peak working memory under FakeTensorMode (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    vocab, tokens, width = map(int, size.split("x"))
    with FakeTensorMode():
        h_s, w_s, h_t, w_t = inputs(vocab, tokens, width, dtype, "cpu")
        tracker = MemTracker()
        tracker.track_external(w_s.weight, w_t.weight, h_s, h_t)
        with tracker:
            loss_fn(method, budget_mib)(h_s, w_s, h_t, w_t).backward()
        peak = tracker.get_tracker_snapshot("peak")
    total = sum(by_kind["Total"] for by_kind in peak.values())
    held = sum(t.numel() * t.element_size() for t in (h_s, h_t, w_s.weight, w_t.weight))
    # the gradients of the student's rows and head, which every method returns: autograd's at the peak
    # (none, for the unfused methods: their peak comes before), the fused pass's buffers (made up front)
    returned = sum(by_kind.get(kind, 0) for by_kind in peak.values() for kind in by_kind if "GRAD" in str(kind))
    if method == "fused":
        returned += (h_s.numel() + w_s.weight.numel()) * h_s.element_size()
    return {"method": method, "size": size, "peak_bytes": total - held, "loss_bytes": total - held - returned}


def run_one(method: str, size: str, dtype: torch.dtype, device: str, repeats: int, budget_mib: float) -> dict:
    """A real run, in this process (``--one``)."""
    vocab, tokens, width = map(int, size.split("x"))
    h_s, w_s, h_t, w_t = inputs(vocab, tokens, width, dtype, device)
    fn = loss_fn(method, budget_mib)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_hwm()
    times, loss = [], None
    for _ in range(repeats + 1):  # the first run warms up
        h_s.grad = w_s.weight.grad = None
        sync()
        start = time.perf_counter()
        loss = fn(h_s, w_s, h_t, w_t)
        loss.backward()
        sync()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else rss_hwm()) - base
    return {"method": method, "size": size, "seconds": min(times[1:]), "peak_bytes": max(peak, 0),
            "loss": loss.item() / tokens, "budget_mib": budget_mib}


def timed(method: str, size: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", method, "--sizes", size, "--dtype", args.dtype, "--device", args.device,
           "--repeats", str(args.repeats), "--budget", str(args.budget)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        killed = proc.returncode in (-9, 137) or "out of memory" in proc.stderr.lower()
        return {"method": method, "size": size, "error": "out of memory" if killed else proc.stderr.strip()[-300:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict], timed_rows: bool) -> str:
    head = ("| V | tokens | hidden | method | s (fwd+bwd) | peak (MiB) | loss/token | time vs chunked | peak vs chunked"
            " | peak vs naive |" if timed_rows else
            "| V | tokens | hidden | method | peak (MiB) | peak vs chunked | peak vs naive | without the returned "
            "gradients (MiB) | vs chunked | vs naive |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    by = {(r["size"], r["method"]): r for r in rows}
    for r in rows:
        v, n, d = r["size"].split("x")
        if "error" in r:
            lines.append(f"| {v} | {n} | {d} | {r['method']} | {r['error']} |" + " |" * (head.count("|") - 6))
            continue
        ratio = lambda other, key: (f"{r[key] / by[(r['size'], other)][key]:.2f}"  # noqa: E731
                                    if key in by.get((r["size"], other), {}) else "-")
        peak = r["peak_bytes"] / 2**20
        if timed_rows:
            lines.append(f"| {v} | {n} | {d} | {r['method']} | {r['seconds']:.3f} | {peak:.0f} | {r['loss']:.6f} | "
                         f"{ratio('chunked', 'seconds')} | {ratio('chunked', 'peak_bytes')} | {ratio('naive', 'peak_bytes')} |")
        else:
            lines.append(f"| {v} | {n} | {d} | {r['method']} | {peak:.0f} | {ratio('chunked', 'peak_bytes')} | "
                         f"{ratio('naive', 'peak_bytes')} | {r['loss_bytes'] / 2**20:.0f} | "
                         f"{ratio('chunked', 'loss_bytes')} | {ratio('naive', 'loss_bytes')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("memory", "time"), default="time")
    parser.add_argument("--sizes", default=",".join(GRID), help="VOCABxTOKENSxHIDDEN,...")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget", type=float, help="loss.logit_chunk_mib of the fused pass (default: the device's)")
    parser.add_argument("--budget-sweep", default="", help="budgets (MiB) to time the fused pass at, e.g. 16,64,256,1024")
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--no-append", action="store_true", help="do not add a section to BENCHMARKS.md")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.budget is None:
        args.budget = chunk_budget(None, torch.device(args.device))
    sizes, methods = args.sizes.split(","), args.methods.split(",")
    if args.one:
        print(json.dumps(run_one(args.one, sizes[0], dtype, args.device, args.repeats, args.budget)))
        return
    if args.budget_sweep:
        rows = []
        for budget in map(float, args.budget_sweep.split(",")):
            args.budget = budget
            rows += [timed("fused", size, args) for size in sizes]
        print(json.dumps(rows, indent=1))
        body = "| V x tokens x hidden | budget (MiB) | s (fwd+bwd) | peak (MiB) |\n|---|---|---|---|\n" + "\n".join(
            f"| {r['size']} | {r['budget_mib']:.0f} | {r['seconds']:.3f} | {r['peak_bytes'] / 2**20:.0f} |"
            for r in rows if "error" not in r)
        title = f"Fused head: chunk budget sweep, {machine(args.device)}, {args.dtype}"
    else:
        if args.mode == "memory":
            rows = [memory(m, size, dtype, args.budget) for size in sizes for m in methods]
        else:
            rows = [timed(m, size, args) for size in sizes for m in methods]
        print(json.dumps(rows, indent=1))
        body = table(rows, args.mode == "time")
        title = (f"Fused head: peak memory of the loss from hidden states ({args.dtype}, FakeTensorMode + MemTracker)"
                 if args.mode == "memory" else
                 f"Fused head: loss forward + backward from hidden states, {machine(args.device)}, {args.dtype}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if not args.no_append:
        command = "python benchmarks/fused_head.py " + " ".join(sys.argv[1:])
        append_section(title, f"Command: `{command}`. Budget {args.budget:g} MiB.\n\n{body}\n")


if __name__ == "__main__":
    main()
