"""The ``distill`` command: the steps around training (training itself runs under the deepspeed launcher)."""

from __future__ import annotations

import argparse
import json
import sys

from distill.errors import DistillError


def _make_student(a: argparse.Namespace) -> None:
    from distill.students import format_layer_map, make_student

    info = make_student(a.teacher, a.out, encoder_layers=a.encoder_layers, decoder_layers=a.decoder_layers,
                        hidden_size=a.hidden_size, num_heads=a.num_heads, ffn_size=a.ffn_size, dtype=a.dtype,
                        seed=a.seed)
    print(format_layer_map(info))
    print(f"student written to {info['out_dir']}")


def _demo_data(a: argparse.Namespace) -> None:
    from distill.demo_data import build_teacher_init, write_demo_data

    paths = write_demo_data(a.out, a.seed, a.n_train, a.n_validation, a.n_test)
    if a.teacher_init:
        paths["teacher_init"] = str(build_teacher_init(a.teacher_init, paths["tokenizer"], seed=a.seed))
    print(json.dumps(paths, indent=2))


def _check_config(a: argparse.Namespace) -> None:
    from distill.config import load_config

    cfg = load_config(a.config, a.overrides)
    for key, value in cfg.flat().items():
        print(f"{key} = {value!r}")


def _demo(a: argparse.Namespace) -> None:
    from distill.demo import run_demo

    run_demo(a.workdir, nproc=a.nproc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-student", help="shrink a teacher by layer copy, or make a narrower random-init student")
    p.add_argument("teacher", help="teacher directory or hub id")
    p.add_argument("out", help="output directory for the student")
    p.add_argument("--encoder-layers", type=int, help="student encoder depth (default: the teacher's)")
    p.add_argument("--decoder-layers", type=int, help="student decoder depth (decoder-only models: its depth)")
    p.add_argument("--hidden-size", type=int, help="new width: random init at this width (MiniEnD-style)")
    p.add_argument("--num-heads", type=int, help="attention heads of a new-width student")
    p.add_argument("--ffn-size", type=int, help="feed-forward width of a new-width student")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of the saved weights")
    p.add_argument("--seed", type=int, default=0, help="seed of a random-init (new-width) student")
    p.set_defaults(func=_make_student)

    p = sub.add_parser("demo-data", help="write the offline demo corpus and tokenizer")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-validation", type=int, default=200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--teacher-init", help="also write a random-init demo teacher here")
    p.set_defaults(func=_demo_data)

    p = sub.add_parser("check-config", help="validate a recipe with overrides and print every setting")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_check_config)

    p = sub.add_parser("demo", help="the whole offline demo: data, teacher, student, distillation vs baseline")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DistillError as exc:
        print(f"distill: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
