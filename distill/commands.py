"""What each ``distill`` subcommand does; ``cli.py`` parses the command line and runs one."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

from distill.errors import DistillError


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
    from distill.train.checkpoint_export import export_checkpoint
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
    from distill.infer.generate import open_model, resolve_dtype, source_length
    from distill.infer.inputs import GENERATION_KEYS, GenerateSettings

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


# subcommand -> what it does (train returns its launcher's status)
COMMANDS: dict[str, Callable[[argparse.Namespace], Optional[int]]] = {
    "export": _export,
    "generate": _generate,
    "evaluate": _evaluate,
    "pseudo-label": _pseudo_label,
    "cache-teacher": _cache_teacher,
    "finetune": _finetune,
    "make-student": _make_student,
    "train-tokenizer": _train_tokenizer,
    "init-model": _init_model,
    "demo-data": _demo_data,
    "train": _train,
    "check-config": _check_config,
    "demo": _run_demo,
}
