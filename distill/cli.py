"""The ``distill`` command: the steps around training (training itself runs under the deepspeed launcher)."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from distill.commands import COMMANDS
from distill.config.settings import TrainingConfig
from distill.dtypes import DTYPE_NAMES
from distill.errors import DistillError, print_error
from distill.files import describe_write_error
from distill.models.from_scratch import FAMILIES, TOKENIZER_KINDS
from distill.runtime.environment import rank_env
from distill.runtime.process_group import exit_rank


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

    p = sub.add_parser("generate", parents=[gen], help="batched generation to JSONL, resumable, sharded over ranks")
    p.add_argument("--model", required=True, help="exported student, teacher directory or hub id")
    p.add_argument("--out", required=True, help="JSONL file: one record per input, in input order")

    p = sub.add_parser("evaluate", parents=[gen], help="ROUGE, latency and tokens/s of models side by side")
    p.add_argument("--model", required=True, action="append", help="repeat for each model to compare")
    p.add_argument("--model-name", action="append",
                   help="a name for each --model, in order (default: the shortest path tail that tells them apart)")
    p.add_argument("--out", required=True, help="directory for predictions, results.json and results.md")
    p.add_argument("--bootstrap-samples", type=int, default=1000)

    p = sub.add_parser("pseudo-label", parents=[gen], help="the teacher's generations as a training dataset (PL)")
    p.add_argument("--model", required=True, help="the teacher")
    p.add_argument("--out", required=True, help="dataset directory for the PL recipe")
    p.add_argument("--eval-split", default="validation", help="copied with gold targets ('' for none)")
    p.add_argument("--min-rouge2", type=float, help="keep a pseudo-label only when its ROUGE-2 against gold reaches this")
    p.add_argument("--below", choices=["gold", "drop"], default="gold",
                   help="what an example under --min-rouge2 becomes")
    p.set_defaults(split="train")

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

    p = sub.add_parser("finetune", help="fine-tune a model with a new sequence-classification head on a labelled "
                                        "task over N seeds; results.json, results.md and test predictions")
    p.add_argument("--config", help="a fine-tune recipe (recipes/finetune_*.yaml); else the GLUE defaults")
    p.add_argument("--model", help="model directory or hub id (model)")
    p.add_argument("--data", help="hub dataset, local directory, or json/jsonl/csv/parquet file (data.path)")
    p.add_argument("--out", help="directory for results.json, results.md and predictions/ (output_dir)")
    p.add_argument("--seeds", type=int, help="seeds to run (training.seeds)")
    p.add_argument("--ds-config", help="DeepSpeed config (training.ds_config); ZeRO-3 partitions the model")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings, as in a fine-tune recipe")

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

    p = sub.add_parser("demo-data", help="write the offline demo corpus and tokenizer")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-validation", type=int, default=200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--teacher-init", help="also write a random-init demo teacher here")

    p = sub.add_parser("train", help="train on this node's ranks; Ctrl-C or SIGTERM stop cleanly (checkpoint, exit 0)")
    p.add_argument("--config", required=True)
    p.add_argument("--nproc", type=int, default=1, help="ranks on this node (GPUs; CPU ranks with DS_ACCELERATOR=cpu)")
    p.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("overrides", nargs="*", metavar="key=value")

    p = sub.add_parser("check-config", help="validate a recipe with overrides and print every setting")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", metavar="key=value")

    p = sub.add_parser("demo", help="the whole offline demo: data, teacher, student, distillation vs baseline")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run")
    return parser


def main(argv: list[str] | None = None) -> int:
    from distill.runtime.environment import adopt_slurm_env
    from distill.runtime.process_group import leave_process_group_at_exit

    adopt_slurm_env()  # srun with one task per rank
    leave_process_group_at_exit()
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0  # train returns its launcher's status
    except DistillError as exc:
        if rank_env().rank == 0:  # every rank hits the same check; one line says it
            print_error(str(exc))
        return 2
    except OSError as exc:  # the machine, not the input: a full disk, a read-only or vanished directory
        print_error(describe_write_error(exc, Path(exc.filename or ".")))
        return 2


if __name__ == "__main__":
    exit_rank(main())
