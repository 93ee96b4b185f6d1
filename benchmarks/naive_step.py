"""The naive distillation loop, for ``distill_step.py`` to compare the trainer against (one rank).

What common scripts do: both models in eager attention, every forward with ``output_hidden_states``
and ``output_attentions``, the logit term as ``kl_div`` over the full vocabulary, the feature terms
taken from the returned tuples. Same models, data, DeepSpeed configs and loss as the trainer's run.
Prints one JSON line (rank 0) with tokens/s, the time split and peak memory.

    deepspeed --num_gpus 2 benchmarks/naive_step.py --config RECIPE key=value ...
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from distill.runtime.process_group import exit_rank, join_process_group  # noqa: E402
from distill.config.settings import ModelConfig  # noqa: E402
from distill.config.parsing import load_config  # noqa: E402
from distill.data.stream import BatchStream  # noqa: E402
from distill.data.collate import Seq2SeqCollator  # noqa: E402
from distill.data.loading import load_split  # noqa: E402
from distill.runtime.dsconfig import read_ds_config, resolve_ds_config  # noqa: E402
from distill.models.layer_maps import layers_to_copy  # noqa: E402
from distill.models.loading import hidden_size, load_model, load_model_config, load_tokenizer  # noqa: E402
from distill.train.monitor import peak_memory_gb, reduce_max, reduce_mean  # noqa: E402


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    cfg = load_config(args[args.index("--config") + 1], [a for a in args if "=" in a and not a.startswith("--")])
    join_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    t = cfg.training
    engines = {}
    for role in ("teacher", "student"):
        mc: ModelConfig = getattr(cfg, role)
        config = load_model_config(mc, role)
        ds = resolve_ds_config(read_ds_config(mc.ds_config, role), cfg, role, world, hidden_size(config),
                               "cpu" if device.type == "cpu" else "cuda", mc.ds_config)
        mc.attn_implementation = "eager"  # what output_attentions needs
        model, keep = load_model(mc, config, ds, t.precision)
        if role == "teacher":
            model.requires_grad_(False)
            engine, *_ = deepspeed.initialize(model=model.eval(), config=ds)
        else:
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        engines[role] = (engine, keep, config)
    teacher, student = engines["teacher"][0], engines["student"][0]
    s_config = engines["student"][2]
    tokenizer = load_tokenizer(cfg.student, "student")
    data = load_split(cfg.data, cfg.data.train_split, "train")
    stream = BatchStream(data, Seq2SeqCollator(tokenizer, cfg.data, s_config.decoder_start_token_id),
                         t.micro_batch_size, rank, world, t.seed)
    loss_cfg, tau = cfg.loss, cfg.loss.temperature
    copied = layers_to_copy(s_config.decoder_layers, engines["teacher"][2].decoder_layers)
    timings = {"teacher": 0.0, "student": 0.0, "loss": 0.0}
    tokens, start = 0, None
    peak_memory_gb(device)  # from here: the steps' peak, loading excluded (as the trainer measures it)
    warmup = 2
    for step in range(t.max_steps):
        if step == warmup:
            start, tokens, timings = time.perf_counter(), 0, dict.fromkeys(timings, 0.0)
        batch = {k: v.to(device) for k, v in next(stream).items()}
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
        t0 = time.perf_counter()
        with torch.no_grad():
            t_out = teacher(**inputs, output_hidden_states=True, output_attentions=True, use_cache=False)
        t1 = time.perf_counter()
        s_out = student(**inputs, output_hidden_states=True, output_attentions=True, use_cache=False)
        t2 = time.perf_counter()
        labels = batch["labels"]
        mask = labels != -100
        ce = F.cross_entropy(s_out.logits.transpose(1, 2), labels, ignore_index=-100)
        kl = F.kl_div(F.log_softmax(s_out.logits / tau, -1), F.softmax(t_out.logits / tau, -1),
                      reduction="none").sum(-1)
        kd = (kl * mask).sum() / mask.sum() * tau**2
        hid = sum(F.mse_loss(s_out.decoder_hidden_states[i + 1][mask], t_out.decoder_hidden_states[j + 1][mask])
                  for i, j in enumerate(copied))
        attn = 0.0
        for name in ("decoder_attentions", "cross_attentions"):
            a_s, a_t = getattr(s_out, name)[-1], getattr(t_out, name)[-1]
            row = (a_t * (torch.log(a_t + 1e-12) - torch.log(a_s + 1e-12))).sum(-1)  # (B, H, T)
            attn = attn + (row * mask[:, None]).sum() / (mask.sum() * a_s.shape[1])
        w = {name: weight.value for name, weight in loss_cfg.weights.items()}
        loss = w["ce"] * ce + w["kd"] * kd + w["hid"] * hid + w["attn"] * attn
        t3 = time.perf_counter()
        student.backward(loss)
        student.step()
        t4 = time.perf_counter()
        if step >= warmup:
            timings["teacher"] += t1 - t0
            timings["student"] += (t2 - t1) + (t4 - t3)
            timings["loss"] += t3 - t2
            tokens += int(batch["attention_mask"].sum()) + int(mask.sum())
    elapsed = time.perf_counter() - start
    steps = t.max_steps - warmup
    counts = torch.tensor([float(tokens)], dtype=torch.float64)
    dist.all_reduce(counts)
    result = {"tokens_per_sec": counts.item() / elapsed, "loss": float(loss),
              **{f"{k}_sec_per_step": v for k, v in reduce_mean({k: v / steps for k, v in timings.items()}, device).items()},
              **reduce_max({"peak_memory_gb": peak_memory_gb(device)}, device)}
    if rank == 0:
        print("NAIVE " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
    exit_rank(0)
