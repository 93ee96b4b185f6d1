"""The Python parts of ``benchmarks/gpu_check.sh``: each subcommand writes one JSON file.

    peak        time a large square matmul: the measured peak that MFU is read against
    kd          a KD run through the project's launcher (``deepspeed launchers/run.py``): BART-shaped
                random-init teacher, its layer-copy student, both ZeRO-3; tokens/s, MFU, memory
    generation  ``benchmarks/generation.py``'s models and inputs, timed on a chosen device and dtype
                (that script itself runs on the CPU in float32 only)
    summary     merge the parts' files and the shell's status lines into gpu_check.json and gpu_check.md

Everything is random-init and built here: no hub access.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import machine  # noqa: E402

LIGER_POINT = "Liger's published point for V = 128k, 8192 tokens, hidden 4096, bf16: 8.7 GB, 182 ms (H100)"


def write_json(path: str | Path, value: dict) -> None:
    Path(path).write_text(json.dumps(value, indent=2) + "\n")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- peak ------------------------------------------------------------------------------------------

def peak(args) -> None:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    n = args.size
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(args.warmup):  # also lets the clocks ramp up
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.repeats):
        a @ b
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.repeats
    tflops = 2 * n ** 3 / seconds / 1e12
    print(f"peak: {n}x{n}x{n} {args.dtype} matmul on {device.type}: {tflops:.4g} TFLOP/s ({1000 * seconds:.2f} ms)")
    write_json(args.json, {"device": machine(device.type), "size": n, "dtype": args.dtype, "repeats": args.repeats,
                           "ms": 1000 * seconds, "tflops": tflops})


# ---- kd --------------------------------------------------------------------------------------------

def build_teacher(out: Path, tokenizer_dir: Path, args) -> Path:
    """A random-init BART at the requested shape with the demo tokenizer; the vocabulary is padded
    past the tokenizer to ``--vocab`` (as BART-large's 50265 rows are), the padding never generated."""
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = max(args.vocab, -(-len(tok) // 8) * 8)
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               decoder_start_token_id=tok.eos_token_id)
    config = BartConfig(vocab_size=vocab, d_model=args.d_model, encoder_layers=args.layers, decoder_layers=args.layers,
                        encoder_attention_heads=args.heads, decoder_attention_heads=args.heads,
                        encoder_ffn_dim=args.ffn, decoder_ffn_dim=args.ffn, max_position_embeddings=1024,
                        forced_eos_token_id=tok.eos_token_id, tie_word_embeddings=True, **ids)
    torch.manual_seed(0)
    with torch.device(args.init_device):  # random init of ~400M parameters is slow on the host
        model = BartForConditionalGeneration(config)
    model.generation_config = GenerationConfig(num_beams=1, max_length=128, forced_eos_token_id=tok.eos_token_id,
                                               suppress_tokens=list(range(len(tok), vocab)) or None, **ids)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def joined_data(root: Path, args) -> tuple[Path, Path]:
    """The demo corpus with ``--join`` documents per example (BART-large sources run to hundreds of
    tokens, a demo document to ~130), and its tokenizer."""
    from examples.demo.corpus import write_demo_data

    paths = write_demo_data(root / "demo", seed=3, n_train=args.examples * args.join, n_validation=8, n_test=8)
    rows = [json.loads(line) for line in Path(paths["train"]).read_text().splitlines()]
    joined = [{"document": " ".join(r["document"] for r in rows[i:i + args.join]),
               "summary": " ".join(r["summary"] for r in rows[i:i + args.join])}
              for i in range(0, len(rows) - args.join + 1, args.join)]
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in joined))
    return data, Path(paths["tokenizer"])


def mean_lengths(data: Path, tokenizer_dir: Path, args) -> tuple[float, float]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    src = [min(len(x), args.source_len) for x in tok([r["document"] for r in rows])["input_ids"]]
    tgt = [min(len(x), args.target_len) for x in tok([r["summary"] for r in rows])["input_ids"]]
    return sum(src) / len(src), sum(tgt) / len(tgt)


def forward_flops(config, source_len: float, target_len: float) -> tuple[float, float]:
    """Forward matmul FLOPs of a BART-style model per source token and per target token (attention
    over the mean real lengths, causal self-attention counted in full, as MFU usually is)."""
    d, v = config.d_model, config.vocab_size
    per_source = config.encoder_layers * (8 * d * d + 4 * d * config.encoder_ffn_dim + 4 * source_len * d)
    per_source += config.decoder_layers * 4 * d * d  # cross-attention keys and values of each source token
    per_target = config.decoder_layers * (12 * d * d + 4 * d * config.decoder_ffn_dim
                                          + 4 * (target_len + source_len) * d)
    per_target += 2 * v * d  # the LM head
    return per_source, per_target


def kd(args) -> None:
    from transformers import AutoConfig

    from distill.models.make_student import make_student
    from examples.demo.pipeline import launch_command, launch_env

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data, tokenizer_dir = joined_data(work, args)
    teacher = build_teacher(work / "teacher", tokenizer_dir, args)
    student = work / "student"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the launcher's rank shares this GPU
    make_student(str(teacher), str(student), decoder_layers=args.student_decoder_layers)
    # torch's AdamW instead of DeepSpeed's fused Adam: the latter is a JIT build with nvcc on first use.
    ds = json.loads((ROOT / "ds_configs/student_zero3.json").read_text())
    ds["optimizer"]["params"]["torch_adam"] = True
    ds_path = work / "student_zero3_torch_adam.json"
    write_json(ds_path, ds)
    assets_s = time.perf_counter() - t0
    print(f"kd: assets built in {assets_s:.0f} s", flush=True)

    run = work / "run"
    overrides = [f"teacher.path={teacher}", f"student.path={student}", f"student.ds_config={ds_path}",
                 f"data.path={data}", f"data.max_source_length={args.source_len}",
                 f"data.max_target_length={args.target_len}", "data.max_train_samples=null", "data.eval_split=null",
                 f"training.precision={args.precision}", f"training.micro_batch_size={args.micro_batch}",
                 f"training.max_steps={args.steps}", "training.warmup_steps=0", f"training.log_every={args.log_every}",
                 "training.save_every=100000", "training.export=false", f"training.output_dir={run}"]
    cmd = launch_command(ROOT / "recipes/demo/kd.yaml", overrides, nproc=1)
    print("$ " + " ".join(cmd), flush=True)
    t1 = time.perf_counter()
    rc = subprocess.run(cmd, env=launch_env(), cwd=ROOT).returncode
    run_s = time.perf_counter() - t1
    if rc != 0:
        raise SystemExit(f"kd: the launcher exited with {rc}")

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "perf/tokens_per_sec" in r]
    measured = [r for r in windows if r["step"] > args.log_every] or windows  # the first window warms up
    mean = lambda key: sum(r[key] for r in measured) / len(measured)  # noqa: E731
    source_len, target_len = mean_lengths(data, tokenizer_dir, args)
    configs = {name: AutoConfig.from_pretrained(path) for name, path in (("teacher", teacher), ("student", student))}
    (t_src, t_tgt), (s_src, s_tgt) = (forward_flops(configs[n], source_len, target_len) for n in ("teacher", "student"))
    src_tps, tgt_tps = mean("perf/source_tokens_per_sec"), mean("perf/target_tokens_per_sec")
    # the teacher runs forward only; the student forward and backward (2x forward)
    flops_per_s = (t_src + 3 * s_src) * src_tps + (t_tgt + 3 * s_tgt) * tgt_tps
    peak_tflops = json.loads(Path(args.peak).read_text())["tflops"] if args.peak and Path(args.peak).is_file() else None
    info = json.loads((run / "run_info.json").read_text())
    memory = json.loads((run / "memory.json").read_text())
    result = {
        "device": machine("cuda" if torch.cuda.is_available() else "cpu"),
        "command": " ".join(cmd),
        "shapes": {n: {"layers": f"{c.encoder_layers}-{c.decoder_layers}", "d_model": c.d_model,
                       "heads": c.encoder_attention_heads, "ffn": c.encoder_ffn_dim, "vocab": c.vocab_size,
                       "params": info[n]["params"]} for n, c in configs.items()},
        "precision": args.precision, "micro_batch": args.micro_batch, "steps": args.steps,
        "measured_steps": [r["step"] for r in measured], "mean_source_tokens": source_len,
        "mean_target_tokens": target_len,
        "tokens_per_sec": mean("perf/tokens_per_sec"), "source_tokens_per_sec": src_tps,
        "target_tokens_per_sec": tgt_tps,
        "sec_per_step": args.micro_batch * (source_len + target_len) / mean("perf/tokens_per_sec"),
        **{f"{phase}_sec_per_step": mean(f"perf/{phase}_sec_per_step") for phase in ("teacher", "student", "loss")},
        "model_tflops_per_sec": flops_per_s / 1e12, "peak_tflops": peak_tflops,
        "mfu": flops_per_s / 1e12 / peak_tflops if peak_tflops else None,
        "peak_memory_gb": max([r["perf/peak_memory_gb"] for r in windows]
                              + [r["peak_memory_gb"] for r in memory["per_rank"]]),
        "memory_json": memory["per_rank"][0],
        "last_losses": {k: v for k, v in windows[-1].items() if k.startswith("loss/")},
        "assets_s": assets_s, "launcher_s": run_s,
    }
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (no peak)"
    print(f"kd: {result['tokens_per_sec']:.0f} tokens/s, {result['model_tflops_per_sec']:.4g} TFLOP/s, MFU {mfu}, "
          f"peak {result['peak_memory_gb']:.2f} GiB", flush=True)
    write_json(args.json, result)


# ---- generation ------------------------------------------------------------------------------------

@torch.no_grad()
def time_generate(model, tok, docs, settings, generation, device) -> tuple[float, int]:
    from distill.infer.generate import generate_batch, length_sorted_batches

    lengths = [len(x) for x in tok(docs)["input_ids"]]
    synchronize(device)
    start = time.perf_counter()
    tokens = 0
    for batch in length_sorted_batches(lengths, settings.batch_size):
        _, counts = generate_batch(model, tok, [docs[i] for i in batch], settings, generation, device)
        tokens += sum(counts)
    synchronize(device)
    return time.perf_counter() - start, tokens


@torch.no_grad()
def time_plain(model, tok, docs, new_tokens: int, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for doc in docs:
        model.generate(**tok(doc, return_tensors="pt").to(device), max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    synchronize(device)
    return time.perf_counter() - start


def generation(args) -> None:
    import tempfile

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from benchmarks.generation import build, documents
    from distill.infer.generate import generation_config_for
    from distill.infer.inputs import GenerateSettings

    hf_logging.set_verbosity_error()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    docs = documents(args.examples, args.source_len, args.vocab)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = dict(zip(("teacher 12-12", "student 12-6"), build(Path(tmp), args)))
        for name, path in paths.items():
            model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
            model = model.to(device).eval()
            tok = AutoTokenizer.from_pretrained(path)
            params = sum(p.numel() for p in model.parameters())
            overrides = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "num_beams": 1}
            gen = generation_config_for(model, overrides)
            for regime, batch in (("latency", 1), ("throughput", args.batch_size)):
                settings = GenerateSettings(batch_size=batch, max_source_length=1024, progress=False)
                time_generate(model, tok, docs[:2], settings, gen, device)  # warm-up
                seconds, tokens = time_generate(model, tok, docs, settings, gen, device)
                rows.append({"model": name, "regime": regime, "batch": batch, "path": "distill generate",
                             "params": params, "seconds": seconds, "tokens": tokens})
            seconds = time_plain(model, tok, docs, args.new_tokens, device)
            rows.append({"model": name, "regime": "latency", "batch": 1, "path": "plain model.generate",
                         "params": params, "seconds": seconds, "tokens": args.examples * args.new_tokens})
            del model
    teacher = {(r["regime"], r["path"]): r["seconds"] for r in rows if r["model"].startswith("teacher")}
    for r in rows:
        r["ms_per_example"] = 1000 * r["seconds"] / args.examples
        r["tokens_per_sec"] = r["tokens"] / r["seconds"]
        if r["model"].startswith("student"):
            r["speedup"] = teacher[(r["regime"], r["path"])] / r["seconds"]
        print(f"generation: {r['model']} {r['regime']} ({r['path']}): {r['ms_per_example']:.1f} ms/example, "
              f"{r['tokens_per_sec']:.0f} tokens/s" + (f", {r['speedup']:.2f}x" if "speedup" in r else ""), flush=True)
    run_settings = {k: v for k, v in vars(args).items() if k not in ("func", "json")}
    write_json(args.json, {"device": machine(device.type), "dtype": args.dtype, "settings": run_settings, "rows": rows})


# ---- summary ---------------------------------------------------------------------------------------

def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _records(value) -> list[dict]:
    """The list of flat records in a benchmark's JSON, wherever it sits (a list, or a dict's list)."""
    if isinstance(value, list) and all(isinstance(x, dict) for x in value):
        return value
    if isinstance(value, dict):
        for item in value.values():
            if found := _records(item):
                return found
    return []


def _cell(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    return "" if x is None else str(x)


def _table(records: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in records]


def no_sync_result(xml: Path) -> dict | None:
    import xml.etree.ElementTree as ET

    try:
        suite = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = []
    for case in suite.iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        message = next((child.get("message", "") for child in case if child.tag != "system-out"), "")
        cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                      "message": message[:300]})
    return {"cases": cases}


def summary(args) -> None:
    work, out = Path(args.work), Path(args.out)
    parts = []
    for line in (work / "status.tsv").read_text().splitlines():
        name, status, seconds, note = (line.split("\t") + [""] * 4)[:4]
        parts.append({"part": name, "status": status, "seconds": float(seconds or 0), "note": note})
    result = {"mode": args.mode, "device": machine("cuda" if torch.cuda.is_available() else "cpu"),
              "date": time.strftime("%Y-%m-%d %H:%M"), "total_s": float(args.total_s), "parts": parts,
              "peak": _load(work / "peak.json"), "kd": _load(work / "kd.json"),
              "fused_head": _load(out / "fused_head.json"), "fused_budget": _load(out / "fused_budget.json"), "no_sync": no_sync_result(work / "no_sync.xml"),
              "generation": _load(work / "generation.json"), "jit_builds": args.jit_builds}
    write_json(out / "gpu_check.json", result)

    md = [f"# GPU check ({args.mode}, {result['date']})", "",
          f"Device: {result['device']}. Total {result['total_s']:.0f} s. "
          f"DeepSpeed JIT op builds: {args.jit_builds or 'none'}."]
    if args.mode != "gpu":
        md += ["Tiny models on a CPU: these figures only show that every part runs, not how fast anything is."]
    md += [""]
    md += _table(parts, ["part", "status", "seconds", "note"])
    if p := result["peak"]:
        md += ["", f"**Matmul peak**: {p['size']}^3 {p['dtype']}: {p['tflops']:.4g} TFLOP/s."]
    if k := result["kd"]:
        shapes = ", ".join(f"{n} {s['layers']} ({s['params'] / 1e6:.3g}M)" for n, s in k["shapes"].items())
        mfu = f"{100 * k['mfu']:.1f}%" if k["mfu"] is not None else "n/a"
        md += ["", f"**KD step** ({k['precision']}, ZeRO-3, 1 rank, {shapes}, micro-batch {k['micro_batch']}, "
               f"~{k['mean_source_tokens']:.0f}+{k['mean_target_tokens']:.0f} tokens per example, steps "
               f"{k['measured_steps']}): {k['tokens_per_sec']:.0f} tokens/s, {k['sec_per_step']:.3f} s/step "
               f"(teacher {k['teacher_sec_per_step']:.3f}, student {k['student_sec_per_step']:.3f}, loss "
               f"{k['loss_sec_per_step']:.3f}), {k['model_tflops_per_sec']:.4g} model TFLOP/s, MFU {mfu}, "
               f"peak memory {k['peak_memory_gb']:.2f} GiB."]
    md += ["", f"**Fused head** ({LIGER_POINT}):"]
    if records := _records(result["fused_head"]):
        columns = list(dict.fromkeys(c for r in records for c in r if not isinstance(r[c], (dict, list))))
        md += [""] + _table(records, columns)
    else:
        md += ["not run (see the parts table)."]
    if records := _records(result["fused_budget"]):
        md += ["", "**Fused head, chunk budget sweep** (`loss.logit_chunk_mib`):", ""]
        md += _table(records, ["size", "budget_mib", "seconds", "peak_bytes"])
    if ns := result["no_sync"]:
        md += ["", "**No-sync check** (`torch.cuda.set_sync_debug_mode(\"error\")`): " + "; ".join(
            f"{c['test']}: {c['outcome']}" + (f" ({c['message']})" if c["message"] else "") for c in ns["cases"])]
    if g := result["generation"]:
        md += ["", f"**Generation** ({g['dtype']}, {g['settings']['examples']} inputs of up to "
                   f"{g['settings']['source_len']} tokens, {g['settings']['new_tokens']} new tokens each):", ""]
        md += _table(g["rows"], ["model", "regime", "batch", "path", "ms_per_example", "tokens_per_sec", "speedup"])
    text = "\n".join(md) + "\n"
    (out / "gpu_check.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True)

    p = sub.add_parser("peak")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--json", required=True)
    p.set_defaults(func=peak)

    p = sub.add_parser("kd")
    p.add_argument("--work", required=True)
    p.add_argument("--peak", help="the peak subcommand's JSON")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--student-decoder-layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=50264)
    p.add_argument("--init-device", default="cuda")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--examples", type=int, default=128, help="training examples (the stream repeats them)")
    p.add_argument("--join", type=int, default=6, help="demo documents per example (6: ~512 source tokens)")
    p.add_argument("--source-len", type=int, default=512)
    p.add_argument("--target-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--json", required=True)
    p.set_defaults(func=kd)

    p = sub.add_parser("generation")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=50265)
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--source-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", required=True)
    p.set_defaults(func=generation)

    p = sub.add_parser("summary")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--total-s", required=True)
    p.add_argument("--jit-builds", default="")
    p.set_defaults(func=summary)

    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
