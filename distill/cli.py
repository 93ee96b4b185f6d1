"""The ``distill`` command: the steps around training (training itself runs under the deepspeed launcher)."""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

from distill.config.settings import TrainingConfig
from distill.dtypes import DTYPE_NAMES
from distill.errors import DistillError, print_error
from distill.models.from_scratch import FAMILIES, TOKENIZER_KINDS
from distill.runtime.cluster import exit_rank


def _make_student(a: argparse.Namespace) -> None:
    from distill.models.make_student import format_layer_map, make_student

    info = make_student(a.teacher, a.out, encoder_layers=a.encoder_layers, decoder_layers=a.decoder_layers,
                        hidden_size=a.hidden_size, num_heads=a.num_heads, ffn_size=a.ffn_size, dtype=a.dtype,
                        seed=a.seed)
    print(format_layer_map(info))
    print(f"student written to {info['out_dir']}")


def _train_tokenizer(a: argparse.Namespace) -> None:
    from distill.config.parsing import load_data_config
    from distill.data.loading import load_split
    from distill.models.from_scratch import train_tokenizer

    if a.vocab_size < 1:
        raise DistillError(f"--vocab-size must be >= 1, got {a.vocab_size}")
    data = load_data_config(a.config, a.overrides, a.data)
    rows = load_split(data, a.split or data.train_split, "train")
    columns = [c for c in (data.source_column, data.target_column) if c is not None]
    tok = train_tokenizer((row[c] for row in rows for c in columns), a.out, a.vocab_size, a.kind, a.sentinels)
    print(f"{a.kind} tokenizer of {len(tok)} tokens, trained on {len(rows)} examples ({', '.join(columns)}), "
          f"written to {a.out}")


def _init_model(a: argparse.Namespace) -> None:
    from distill.models.from_scratch import init_model

    out = init_model(a.out, a.tokenizer, a.family, layers=a.layers, d_model=a.d_model, ffn=a.ffn, heads=a.heads,
                     seed=a.seed, max_positions=a.max_positions)
    print(f"random-init {a.family}, {a.layers} layers{' per stack' if a.family in ('bart', 't5') else ''}, "
          f"d_model {a.d_model}, written to {out}")


def _demo(name: str):
    """A module of the demo, which lives in the source checkout (examples/demo), not in the library."""
    import importlib

    root = Path(__file__).resolve().parents[1]
    if not (root / "examples" / "demo").is_dir():
        raise DistillError(f"the demo runs from a source checkout: {root / 'examples' / 'demo'} is missing")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"examples.demo.{name}")


def _demo_data(a: argparse.Namespace) -> None:
    corpus = _demo("corpus")
    paths = corpus.write_demo_data(a.out, a.seed, a.n_train, a.n_validation, a.n_test)
    if a.teacher_init:
        from distill.models.from_scratch import init_model

        paths["teacher_init"] = str(init_model(a.teacher_init, paths["tokenizer"], seed=a.seed))
    print(json.dumps(paths, indent=2))


def _check_config(a: argparse.Namespace) -> None:
    from distill.config.parsing import load_config

    cfg = load_config(a.config, a.overrides)
    from distill.errors import ConfigErrors
    from distill.paths import missing_inputs

    if missing := missing_inputs(cfg.flat()):  # the run checks them before anything loads too
        raise ConfigErrors(missing)
    for key, value in cfg.flat().items():
        print(f"{key} = {value!r}")


def _train(a: argparse.Namespace) -> int:
    from distill.runtime.supervise import train

    status = train(a.launcher, a.nproc, a.master_port, a.config, a.overrides)
    return status if status >= 0 else 128 - status  # killed by a signal: the shell's convention


def _run_demo(a: argparse.Namespace) -> None:
    _demo("pipeline").run_demo(a.workdir, nproc=a.nproc)


def _export(a: argparse.Namespace) -> None:
    from distill.infer.export import export_checkpoint
    from distill.dtypes import torch_dtype

    info = export_checkpoint(a.checkpoint, a.out, torch_dtype(a.dtype) if a.dtype else None, a.model, a.max_shard_size)
    print(f"exported {info['checkpoint']} (written by {info['world_size']} ranks, {info['tensors']} tensors) "
          f"to {info['out_dir']}")


def _check_flags(a: argparse.Namespace) -> None:
    for key in ("batch_size", "max_source_length", "max_new_tokens", "num_beams", "top_k", "max_samples"):
        value = getattr(a, key, None)
        if value is not None and value < 1:
            raise DistillError(f"--{key.replace('_', '-')} must be >= 1, got {value}")


def _start(a: argparse.Namespace):
    """This rank's device, in the launcher's process group if there is one (the output checks that come
    before any weights load are decided on rank 0 and shared)."""
    from transformers.utils import logging as hf_logging

    from distill.infer.generate import device_for_rank, init_ranks

    hf_logging.set_verbosity_error()  # one line per problem, not per batch
    _check_flags(a)
    device = device_for_rank()  # before the process group, so NCCL binds each rank to its own GPU
    init_ranks()
    return device


class _Opened(NamedTuple):
    location: str
    config: Any
    tokenizer: Any
    settings: Any


def _open(a: argparse.Namespace, path: str, device) -> _Opened:
    """A model with its settings, its weights not loaded yet: a missing model or a --max-source-length it
    cannot take fails before any data or weights load."""
    from distill.infer.generate import GENERATION_KEYS, GenerateSettings, open_model, resolve_dtype, source_length

    location, config, tokenizer = open_model(path)
    dtype = str(resolve_dtype(a.dtype, device)).removeprefix("torch.")  # "auto" as it resolves on this device
    settings = GenerateSettings(batch_size=a.batch_size,
                                max_source_length=source_length(config, tokenizer, a.max_source_length),
                                source_prefix=a.source_prefix, dtype=dtype, static_cache=a.static_cache,
                                compile=a.compile, generation={k: getattr(a, k) for k in GENERATION_KEYS})
    return _Opened(location, config, tokenizer, settings)


def _load(a: argparse.Namespace, opened: _Opened, device):
    """(model, tokenizer, device, settings) from what ``_open`` returned."""
    from distill.infer.generate import load_for_generation

    model, _ = load_for_generation(opened.location, opened.config, opened.settings, device, a.ds_config)
    return model, opened.tokenizer, device, opened.settings


def _examples(a: argparse.Namespace):
    from distill.infer.generate import read_examples

    return read_examples(a.data, a.split, a.source_column, a.target_column, a.name, a.max_samples)


def _fingerprint(a: argparse.Namespace, opened: _Opened, examples) -> dict:
    from distill.infer.outputs import data_origin, fingerprint

    data = data_origin(a.data, a.split, a.source_column, a.target_column, a.name)
    return fingerprint(opened.location, opened.settings, examples, data)


def _generate(a: argparse.Namespace) -> None:
    from distill.infer.outputs import claim_output
    from distill.infer.generate import run_generation

    device = _start(a)
    opened = _open(a, a.model, device)
    examples = _examples(a)  # before the weights: a bad path or column fails fast
    claim_output(Path(a.out), _fingerprint(a, opened, examples), a.fresh)
    model, tokenizer, device, settings = _load(a, opened, device)
    records = run_generation(model, tokenizer, examples, settings, Path(a.out), device,
                             synced=a.ds_config is not None)
    _say(f"{len(records)} generations in {a.out}")


def _evaluate(a: argparse.Namespace) -> None:
    from distill.infer.evaluate import evaluate_models, model_names

    device = _start(a)
    names = model_names(a.model, a.model_name)
    opened = {path: _open(a, path, device) for path in a.model}
    examples = _examples(a)
    if any(e.target is None for e in examples):
        raise DistillError(f"evaluation needs references: the data has no column '{a.target_column}'")
    fingerprints = {name: _fingerprint(a, opened[path], examples) for name, path in zip(names, a.model)}
    results = evaluate_models(dict(zip(names, a.model)), examples, lambda path: _load(a, opened[path], device),
                              Path(a.out), fingerprints, synced=a.ds_config is not None, samples=a.bootstrap_samples,
                              fresh=a.fresh)
    _say(results["table"])


def _pseudo_label(a: argparse.Namespace) -> None:
    from distill.infer.pseudo_label import pseudo_label

    device = _start(a)
    opened = _open(a, a.model, device)
    summary = pseudo_label(lambda: _load(a, opened, device)[:3], opened.location, opened.settings, a.data,
                           Path(a.out), a.split, a.source_column, a.target_column, a.name, a.eval_split or None,
                           a.max_samples, a.min_rouge2, a.below, synced=a.ds_config is not None, fresh=a.fresh)
    _say(json.dumps(summary, indent=2))


def _cache_teacher(a: argparse.Namespace) -> None:
    from distill.config.parsing import load_data_config
    from distill.infer.cache_teacher import CacheSettings, cache_teacher

    data = load_data_config(a.config, a.overrides, a.data)
    settings = CacheSettings(top_k=a.top_k, batch_size=a.batch_size, logit_dtype=a.logit_dtype,
                             shard_examples=a.shard_examples, dtype=a.dtype, chunk_mib=a.chunk_mib)
    settings.validate()
    device = _start(a)
    summary = cache_teacher(a.model, a.revision, data, a.split or data.train_split, Path(a.out), settings, device,
                            a.ds_config, a.fresh, say=_say, seed=a.seed)
    _say(json.dumps(summary, indent=2))


def _finetune(a: argparse.Namespace) -> None:
    from distill.finetune.config import load_finetune_config
    from distill.finetune.run import finetune, results_table

    flags = {"model": a.model, "data.path": a.data, "output_dir": a.out, "training.seeds": a.seeds,
             "training.ds_config": a.ds_config}  # the flags win over key=value overrides of the same settings
    cfg = load_finetune_config(a.config, [*a.overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)])
    _say(results_table(finetune(cfg, _say)) + f"results.json, results.md and predictions/ in {cfg.output_dir}")


def _say(text: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text, flush=True)


def _generation_parent() -> argparse.ArgumentParser:
    """Flags shared by generate, evaluate and pseudo-label."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--data", required=True, help="hub dataset, local directory, json/jsonl/csv/parquet file, or .txt")
    p.add_argument("--name", help="dataset configuration, e.g. 3.0.0")
    p.add_argument("--split", default="test")
    p.add_argument("--source-column", default="document")
    p.add_argument("--target-column", default="summary")
    p.add_argument("--source-prefix", default="", help='e.g. "summarize: " for T5')
    p.add_argument("--max-samples", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-source-length", type=int, help="default: all the model takes (its position limit)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES])
    p.add_argument("--ds-config", help="ZeRO-3 config: partition the model over the ranks (synchronized generation)")
    p.add_argument("--static-cache", action="store_true", help="static KV cache (pairs with --compile on GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    p.add_argument("--fresh", action="store_true",
                   help="discard what an earlier run wrote to --out (a rerun otherwise continues it, if it was "
                        "written by the same model, data and settings)")
    g = p.add_argument_group("generation (default: the model's generation config)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--min-new-tokens", type=int)
    g.add_argument("--num-beams", type=int)
    g.add_argument("--do-sample", action="store_const", const=True)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--length-penalty", type=float)
    g.add_argument("--no-repeat-ngram-size", type=int)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--early-stopping", action="store_const", const=True)
    return p


class _ShowDefaults(argparse.HelpFormatter):
    """Each option's default in its help, where it has one (not None, empty, or a flag's False)."""

    def _format_action(self, action: argparse.Action) -> str:
        default = action.default
        if action.option_strings and "%(default)" not in (action.help or "") and not (
                default is None or default is False or default == "" or default is argparse.SUPPRESS):
            action = copy.copy(action)
            action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"
        return super()._format_action(action)


class _SubParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _ShowDefaults)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # from the deepspeed launcher
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_SubParser)
    gen = _generation_parent()

    p = sub.add_parser("export", help="rebuild the student of a ZeRO checkpoint as a Hugging Face directory (CPU)")
    p.add_argument("checkpoint", help="run directory, its checkpoints/ directory, or one checkpoint tag directory")
    p.add_argument("out")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: float32")
    p.add_argument("--model", help="student directory (config, tokenizer) when the checkpoint holds none")
    p.add_argument("--max-shard-size", default="5GB")
    p.set_defaults(func=_export)

    p = sub.add_parser("generate", parents=[gen], help="batched generation to JSONL, resumable, sharded over ranks")
    p.add_argument("--model", required=True, help="exported student, teacher directory or hub id")
    p.add_argument("--out", required=True, help="JSONL file: one record per input, in input order")
    p.set_defaults(func=_generate)

    p = sub.add_parser("evaluate", parents=[gen], help="ROUGE, latency and tokens/s of models side by side")
    p.add_argument("--model", required=True, action="append", help="repeat for each model to compare")
    p.add_argument("--model-name", action="append",
                   help="a name for each --model, in order (default: the shortest path tail that tells them apart)")
    p.add_argument("--out", required=True, help="directory for predictions, results.json and results.md")
    p.add_argument("--bootstrap-samples", type=int, default=1000)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("pseudo-label", parents=[gen], help="the teacher's generations as a training dataset (PL)")
    p.add_argument("--model", required=True, help="the teacher")
    p.add_argument("--out", required=True, help="dataset directory for the PL recipe")
    p.add_argument("--eval-split", default="validation", help="copied with gold targets ('' for none)")
    p.add_argument("--min-rouge2", type=float, help="keep a pseudo-label only when its ROUGE-2 against gold reaches this")
    p.add_argument("--below", choices=["gold", "drop"], default="gold",
                   help="what an example under --min-rouge2 becomes")
    p.set_defaults(func=_pseudo_label, split="train")

    p = sub.add_parser("cache-teacher", help="the teacher's top-K logits of every target token of a split, for "
                                             "training without a live teacher (teacher.cache)")
    p.add_argument("--model", required=True, help="the teacher: directory or hub id")
    p.add_argument("--revision", help="hub revision of --model")
    p.add_argument("--data", required=True, help="hub dataset, local directory, or json/jsonl/csv/parquet file")
    p.add_argument("--split", help="default: data.train_split (train)")
    p.add_argument("--top-k", type=int, default=64, help="logits kept per target token")
    p.add_argument("--out", required=True, help="cache directory (a rerun continues it)")
    p.add_argument("--config", help="a training recipe whose data settings to tokenize with (else the defaults)")
    p.add_argument("--ds-config", help="ZeRO-3 config: partition the teacher over the ranks")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--logit-dtype", default="float16", help="float16 or bfloat16")
    p.add_argument("--shard-examples", type=int, default=1024, help="examples per shard file (the unit of resume)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES], help="the teacher's compute dtype")
    p.add_argument("--chunk-mib", type=float, help="memory budget of one chunk of the head's logits")
    p.add_argument("--fresh", action="store_true", help="discard what --out holds")
    p.add_argument("--seed", type=int, default=TrainingConfig.seed,
                   help="training.seed of the runs that read the cache: a text objective's masks are drawn from it")
    p.add_argument("overrides", nargs="*", metavar="data.key=value", help="data settings, as in a training recipe")
    p.set_defaults(func=_cache_teacher)

    p = sub.add_parser("finetune", help="fine-tune a model with a new sequence-classification head on a labelled "
                                        "task over N seeds; results.json, results.md and test predictions")
    p.add_argument("--config", help="a fine-tune recipe (recipes/finetune_*.yaml); else the GLUE defaults")
    p.add_argument("--model", help="model directory or hub id (model)")
    p.add_argument("--data", help="hub dataset, local directory, or json/jsonl/csv/parquet file (data.path)")
    p.add_argument("--out", help="directory for results.json, results.md and predictions/ (output_dir)")
    p.add_argument("--seeds", type=int, help="seeds to run (training.seeds)")
    p.add_argument("--ds-config", help="DeepSpeed config (training.ds_config); ZeRO-3 partitions the model")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings, as in a fine-tune recipe")
    p.set_defaults(func=_finetune)

    p = sub.add_parser("make-student", help="shrink a teacher by layer copy, or make a narrower random-init student")
    p.add_argument("teacher", help="teacher directory or hub id")
    p.add_argument("out", help="output directory for the student")
    p.add_argument("--encoder-layers", type=int, help="student encoder depth (default: the teacher's)")
    p.add_argument("--decoder-layers", type=int, help="student decoder depth (decoder-only models: its depth)")
    p.add_argument("--hidden-size", type=int, help="new width: random init at this width (MiniEnD-style)")
    p.add_argument("--num-heads", type=int, help="attention heads of a new-width student")
    p.add_argument("--ffn-size", type=int, help="feed-forward width of a new-width student")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="dtype of the saved weights")
    p.add_argument("--seed", type=int, default=0, help="seed of a random-init (new-width) student")
    p.set_defaults(func=_make_student)

    p = sub.add_parser("train-tokenizer", help="train a tokenizer on a dataset's text (to start without a "
                                               "pretrained model; BART special tokens)")
    p.add_argument("--data", required=True, help="hub dataset, local directory, or json/jsonl/csv/parquet file")
    p.add_argument("--split", help="default: data.train_split (train)")
    p.add_argument("--out", required=True, help="tokenizer directory (written whole, then moved into place)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--kind", choices=TOKENIZER_KINDS, default="bpe",
                   help="bpe: byte-level BPE (GPT-2/LLaMA-3 style); unigram: SentencePiece-style, byte fallback")
    p.add_argument("--sentinels", type=int, default=0,
                   help="T5 span-corruption sentinels <extra_id_N> to add (T5 has 100)")
    p.add_argument("--config", help="a training recipe whose data settings (columns) to read")
    p.add_argument("overrides", nargs="*", metavar="data.key=value", help="data settings, as in a training recipe")
    p.set_defaults(func=_train_tokenizer)

    p = sub.add_parser("init-model", help="a randomly initialised model of a chosen family and size for a "
                                          "tokenizer (to pretrain with data.objective)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (distill train-tokenizer)")
    p.add_argument("--out", required=True, help="model directory (written whole, then moved into place)")
    p.add_argument("--family", choices=FAMILIES, default="bart",
                   help="bart, t5 (encoder-decoder), bert, roberta, modernbert (masked LM), llama (decoder-only)")
    p.add_argument("--layers", type=int, default=6, help="layers (encoder and decoder layers each for bart, t5)")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048, help="feed-forward width")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--max-positions", type=int, default=1024, help="longest input or output, in tokens")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_init_model)

    p = sub.add_parser("demo-data", help="write the offline demo corpus and tokenizer")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-validation", type=int, default=200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--teacher-init", help="also write a random-init demo teacher here")
    p.set_defaults(func=_demo_data)

    p = sub.add_parser("train", help="train on this node's ranks; Ctrl-C or SIGTERM stop cleanly (checkpoint, exit 0)")
    p.add_argument("--config", required=True)
    p.add_argument("--nproc", type=int, default=1, help="ranks on this node (GPUs; CPU ranks with DS_ACCELERATOR=cpu)")
    p.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_train)

    p = sub.add_parser("check-config", help="validate a recipe with overrides and print every setting")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_check_config)

    p = sub.add_parser("demo", help="the whole offline demo: data, teacher, student, distillation vs baseline")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run")
    p.set_defaults(func=_run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from distill.runtime.cluster import adopt_slurm_env, leave_process_group_at_exit

    adopt_slurm_env()  # srun with one task per rank
    leave_process_group_at_exit()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0  # train returns its launcher's status
    except DistillError as exc:
        if int(os.environ.get("RANK", 0)) == 0:  # every rank hits the same check; one line says it
            print_error(str(exc))
        return 2
    except OSError as exc:  # the machine, not the input: a full disk, a read-only or vanished directory
        from distill.train.checkpoint import describe_write_error

        print_error(describe_write_error(exc, Path(exc.filename or ".")))
        return 2


if __name__ == "__main__":
    exit_rank(main())
