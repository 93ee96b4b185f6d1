"""Attention distillation, the project's way against the common way, on the same weights and inputs.

* project: both models run SDPA everywhere; ``distill.models.capture`` records Q/K/V at the mapped layer only
  and ``distill.losses.features`` builds the distributions/relations there.
* naive: both models in eager attention with ``output_attentions=True`` and ``output_hidden_states=True``
  (what distillation scripts commonly ask for), the loss taken from the returned maps; MiniLMv2's
  Q/K/V are recomputed from the returned hidden state with the layer's own projections.

One step = teacher forward (no grad) + student forward + loss + student backward. Each variant runs in
its own process so peak memory is its own: on a GPU the CUDA peak allocation over the timed steps
above the weights; on CPU the growth of the peak resident set (VmHWM) from the built models to the end.

    python benchmarks/attention_capture.py [--source-len 1024] [--target-len 256] [--batch 2] [--steps 3]
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
from distill.models.capture import CAPTURE_ATTENTION, FeatureModel, register_attention  # noqa: E402
from distill.config.parsing import _build  # noqa: E402
from distill.config.loss import LossConfig  # noqa: E402
from distill.data.collate import source_index, target_index  # noqa: E402
from distill.losses.objective import Objective  # noqa: E402

METHODS = {
    "miniend_d": {"w_ce": 0.0, "w_attn": 1.0, "attention": {"sites": ["decoder_self", "decoder_cross"]}},
    "minilmv2": {"w_ce": 0.0, "w_rel": 1.0, "relation": {"sites": ["encoder_self"], "heads": 16}},
}


def _config(layers: int, d_model: int, heads: int, vocab: int):
    from transformers import BartConfig

    return BartConfig(vocab_size=vocab, d_model=d_model, encoder_layers=layers[0], decoder_layers=layers[1],
                      encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=4 * d_model,
                      decoder_ffn_dim=4 * d_model, max_position_embeddings=2048, dropout=0.0,
                      attention_dropout=0.0, pad_token_id=1, decoder_start_token_id=2)


def _naive_loss(method: str, cfg: LossConfig, s_out, t_out, s_model, t_model, batch) -> torch.Tensor:
    """The loss from ``output_attentions`` / ``output_hidden_states``, written the way scripts do."""
    if method == "miniend_d":
        total = 0.0
        rows = batch["labels"] != -100
        for name in ("decoder_attentions", "cross_attentions"):
            s, t = getattr(s_out, name)[-1], getattr(t_out, name)[-1]
            kl = (t * (torch.log(t + 1e-12) - torch.log(s + 1e-12))).sum(-1)  # (B, H, Tq)
            total = total + (kl * rows[:, None]).sum() / (rows.sum() * s.shape[1])
        return total
    total = 0.0
    rows = batch["attention_mask"].bool()
    keep = rows[:, None, None, :]
    layers = {"s": (s_model.model.encoder.layers[-1], s_out.encoder_hidden_states[-2]),
              "t": (t_model.model.encoder.layers[-2], t_out.encoder_hidden_states[-3])}
    for proj in ("q_proj", "k_proj", "v_proj"):
        rel = {}
        for role, (layer, hidden) in layers.items():
            x = getattr(layer.self_attn, proj)(hidden)
            b, n, w = x.shape
            a = cfg.relation.heads
            x = x.view(b, n, a, w // a).transpose(1, 2)
            scores = x @ x.transpose(-1, -2) / (w // a) ** 0.5
            rel[role] = F.log_softmax(scores.masked_fill(~keep, -1e9), dim=-1)
        kl = (rel["t"].exp() * (rel["t"] - rel["s"])).sum(-1)
        total = total + (kl * rows[:, None]).sum() / (rows.sum() * cfg.relation.heads)
    return total


def run_variant(args) -> dict:
    """One variant in this process: build, warm up, time ``args.steps`` steps."""
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    register_attention()
    from transformers import BartForConditionalGeneration

    impl = "eager" if args.variant == "naive" else CAPTURE_ATTENTION
    t_model = BartForConditionalGeneration._from_config(_config((6, 6), args.d_model, args.heads, args.vocab),
                                                        attn_implementation=impl).to(device).eval()
    s_model = BartForConditionalGeneration._from_config(_config((6, 3), args.d_model, args.heads, args.vocab),
                                                        attn_implementation=impl).to(device).train()
    t_model.requires_grad_(False)
    cfg = _build(LossConfig, METHODS[args.method], "loss.")
    objective = Objective(cfg, 10, s_model.config, t_model.config)
    if args.variant == "project":
        student = FeatureModel(s_model, objective.student_request, "student",
                               objective.build_projections(torch.float32), objective.project)
        teacher = FeatureModel(t_model, objective.teacher_request, "teacher")
    b, ls, lt = args.batch, args.source_len, args.target_len
    ids = torch.randint(4, args.vocab, (b, ls), device=device)
    mask = torch.ones(b, ls, dtype=torch.long, device=device)
    mask[0, ls * 3 // 4:] = 0  # one padded row
    dec = torch.randint(4, args.vocab, (b, lt), device=device)
    labels = dec.roll(-1, 1)
    labels[0, lt * 3 // 4:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "labels": labels,
             "target_index": target_index(labels), "source_index": source_index(mask)}
    totals = torch.tensor(objective.counts(batch, True), dtype=torch.float32, device=device)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}

    def step() -> float:
        if args.variant == "naive":
            with torch.no_grad():
                t_out = t_model(**inputs, output_attentions=True, output_hidden_states=True)
            s_out = s_model(**inputs, output_attentions=True, output_hidden_states=True)
            loss = _naive_loss(args.method, cfg, s_out, t_out, s_model, t_model, batch)
        else:
            with torch.no_grad():
                t_out = teacher(rows=batch["target_index"], features=True, **inputs)
            s_out = student(rows=batch["target_index"], features=True, **inputs)
            loss = objective(batch, s_out, t_out, True, totals)[0]
        loss.backward()
        s_model.zero_grad(set_to_none=True)
        return float(loss)

    # CPU: the peak resident set cannot be reset, so it is read before the warm-up step (models built).
    base = rss_hwm() if device.type == "cpu" else 0
    losses = [step()]  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_hwm()) - base
    return {"sec_per_step": seconds, "peak_bytes": max(peak, 0), "loss": losses[-1], "device": device.type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-len", type=int, default=1024)
    parser.add_argument("--target-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--method", choices=sorted(METHODS))
    parser.add_argument("--variant", choices=["project", "naive"])
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    if args.variant:  # a child: one measurement, as JSON
        print(json.dumps(run_variant(args)))
        return
    results = {}
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k not in ("method", "variant", "no_write")]
    for method in sorted(METHODS):
        for variant in ("project", "naive"):
            out = subprocess.run([sys.executable, __file__, *passthrough, f"--method={method}", f"--variant={variant}"],
                                 capture_output=True, text=True, check=True)
            results[(method, variant)] = json.loads(out.stdout.strip().splitlines()[-1])
    lines = ["| method | variant | s/step | peak memory (MiB) | loss | time ratio | memory ratio |", "|---|---|---|---|---|---|---|"]
    for method in sorted(METHODS):
        p, n = results[(method, "project")], results[(method, "naive")]
        for variant, r in (("project", p), ("naive", n)):
            ratio_t = f"{p['sec_per_step'] / n['sec_per_step']:.2f}" if variant == "project" else "1.00"
            ratio_m = f"{p['peak_bytes'] / max(n['peak_bytes'], 1):.2f}" if variant == "project" else "1.00"
            lines.append(f"| {method} | {variant} | {r['sec_per_step']:.3f} | {r['peak_bytes'] / 2**20:.0f} | "
                         f"{r['loss']:.5f} | {ratio_t} | {ratio_m} |")
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    device = results[(sorted(METHODS)[0], "project")]["device"]
    command = "python benchmarks/attention_capture.py " + " ".join(passthrough)
    append_section("Attention capture vs eager `output_attentions`",
                   f"Machine: {machine(device)} ({device}). Command: `{command}`.\n"
                   f"Teacher BART 6-6, student 6-3, d_model {args.d_model}, {args.heads} heads, batch {args.batch}, "
                   f"source {args.source_len} / target {args.target_len} tokens. One step = teacher forward + student "
                   "forward, loss and backward; peak memory is the growth above the built models. Ratios are project / "
                   "naive, measured in the same run. The two losses agree (same weights, same inputs).\n\n" + table)


if __name__ == "__main__":
    main()
