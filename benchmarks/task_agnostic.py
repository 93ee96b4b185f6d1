"""The task-agnostic papers' claims on real text, with the project's own commands on 2 ranks: Udagawa et al.
(2023: MHA is the best overall, HS a competitive baseline above all with the uniform+last map, OD alone lags)
and Zhang et al. (2023, MiniEnD: encoder-only recipes are unstable on encoder-decoder models, MiniEnD-D and
MiniEnD-E stable and competitive).

1. the pre-training corpus (``prose_corpus.py``: Python docs and man pages) and the labelled tasks
   (``labelled_tasks.py``), or ``--corpus`` / ``--tasks`` of your own (a jsonl/txt corpus with a ``text``
   column; a directory of task directories of train/validation/test jsonl with ``text``, optional ``text_pair``,
   ``label``);
2. a tokenizer with T5's sentinels, and two teachers pretrained from scratch by their own objective until
   their validation CE stops improving: a RoBERTa-style encoder by MLM, a T5-style encoder-decoder by span
   corruption;
3. students of two shapes from each: half depth by layer copy, and half depth at half width at random init;
4. each student distilled with one step budget and seed: encoder by OD, HS with each of the four maps, MHA
   and MHA + HS; encoder-decoder by MiniEnD-D, MiniEnD-E, the encoder-only recipe (last-layer self-attention
   relations alone) and logits alone; both by the objective alone with no teacher (the baseline);
5. every teacher and student fine-tuned on every task with ``--seeds`` seeds (``distill finetune``): the mean
   test score per task with a 95% interval over seeds, and the average over tasks; written to BENCHMARKS.md
   under "Task-agnostic distillation on real text".

Every stage leaves a marker; a rerun skips finished stages (``benchmarks.common.Stages``).

    python benchmarks/task_agnostic.py --workdir runs/task_agnostic [--steps 600] [--teacher-steps 3000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Stages, append_section, machine  # noqa: E402
from distill.finetune.metrics import t_interval  # noqa: E402

RECIPES = ROOT / "recipes"
BASELINE = "objective alone"
NO_PRETRAINING = "random init"
# name -> (recipe, overrides); the encoder's students read MLM, the encoder-decoder's span corruption
ENCODER_METHODS = {
    "OD": ("udagawa_od_roberta.yaml", []),
    **{f"HS {m}": ("udagawa_hs_roberta.yaml", [f"loss.hidden.map={m}"])
       for m in ("last", "uniform", "uniform_consecutive", "uniform_last")},
    "MHA": ("udagawa_mha_roberta.yaml", []),
    "MHA + HS": ("udagawa_mha_roberta.yaml", ["loss.w_hid=1.0", "loss.hidden.map=uniform_last",
                                              "loss.hidden.stacks=encoder"]),
    BASELINE: ("udagawa_od_roberta.yaml", ["loss.w_kd=0", "loss.w_ce=1.0"]),
}
SEQ2SEQ_METHODS = {
    "MiniEnD-D": ("miniend_d_pretrain.yaml", []),
    "MiniEnD-E": ("miniend_e_pretrain.yaml", []),
    "encoder-only recipe": ("miniend_d_pretrain.yaml", ["loss.w_kd=0", "loss.w_attn=0", "loss.w_rel=1.0",
                                                        "loss.relation.sites=encoder_self"]),
    "logits alone": ("miniend_d_pretrain.yaml", ["loss.w_attn=0"]),
    BASELINE: ("miniend_d_pretrain.yaml", ["loss.w_kd=0", "loss.w_attn=0", "loss.w_ce=1.0"]),
}
FAMILIES = {"encoder": ("roberta", "mlm", ENCODER_METHODS), "encoder-decoder": ("t5", "span_corruption", SEQ2SEQ_METHODS)}


def text_data(a: argparse.Namespace, corpus: Path, objective: str) -> list[str]:
    return [f"data.path={corpus}", "data.name=null", "data.train_split=train", "data.eval_split=validation",
            "data.source_column=text", "data.target_column=null", f"data.objective={objective}",
            f"data.block_length={a.block_length}", f"data.max_eval_samples={a.eval_samples}",
            "data.max_train_samples=null"]


def training(a: argparse.Namespace, steps: int, lr: float) -> list[str]:
    return [f"training.max_steps={steps}", f"training.learning_rate={lr}", f"training.micro_batch_size={a.batch}",
            "training.gradient_accumulation_steps=1", f"training.seed={a.seed}", "training.precision=fp32",
            f"training.warmup_steps={max(1, steps // 10)}", "training.log_every=50", f"training.save_every={a.eval_every}"]


def slug(name: str) -> str:
    return name.replace(", ", "-").replace(" + ", "+").replace(" ", "_")


def build_teacher(a, st: Stages, family: str, objective: str, tok: Path, corpus: Path) -> Path:
    init = a.workdir / f"{family}-init"
    st.run(init / "config.json", st.distill("init-model", "--family", family, "--tokenizer", tok, "--out", init,
                                            "--layers", a.teacher_layers, "--d-model", a.d_model, "--ffn", 4 * a.d_model,
                                            "--heads", a.heads, "--seed", a.seed, "--max-positions", a.block_length + 2),
           f"random-init {family} teacher")
    run = st.train(RECIPES / "demo" / "baseline.yaml", a.workdir / f"{family}-teacher",
                   [f"student.path={init}", "student.ds_config=ds_configs/student_zero2.json",
                    *text_data(a, corpus, objective), *training(a, a.teacher_steps, a.teacher_lr),
                    f"training.eval_every={a.eval_every}", "eval.best_metric=eval/ce",
                    f"training.early_stopping_patience={a.patience}"],
                   f"pretrain the {family} teacher by {objective} until its validation CE stops improving")
    return run / "best"


def students(a, st: Stages, family: str, teacher: Path) -> dict[str, Path]:
    half = a.teacher_layers // 2
    depth = ["--encoder-layers", half] + (["--decoder-layers", half] if family == "t5" else [])
    shapes = {"half depth": [], "half depth, half width": ["--hidden-size", a.d_model // 2, "--num-heads", a.heads,
                                                           "--ffn-size", 2 * a.d_model]}
    out = {}
    for shape, width in shapes.items():
        path = a.workdir / "students" / f"{family}-{slug(shape)}"
        st.run(path / "config.json", st.distill("make-student", teacher, path, *depth, *width, "--seed", a.seed),
               f"{family} student, {shape}")
        out[shape] = path
    return out


def student_overrides(a, shape: str, method: str, overrides: list[str], student: Path, teacher: Path,
                      data: list[str]) -> list[str]:
    """The command-line settings of one student's distillation: the method's own, then the shared ones."""
    extra = [f"teacher.path={teacher}"]  # the baseline names it too, and loads it not (no teacher term)
    if "width" in shape and (method.startswith("HS") or method == "MHA + HS"):
        extra.append("loss.hidden.projection=true")  # hidden states of two widths meet through a projection
    # relation heads dividing both widths (MiniLMv2 uses 32-48)
    return [f"student.path={student}", *overrides, *extra, *data, *training(a, a.steps, a.lr),
            f"loss.relation.heads={math.gcd(32, a.d_model // 2)}", "training.eval_every=0"]


def finetune(a, st: Stages, model: Path, task: Path, out: Path, title: str) -> dict:
    kind = "regression" if isinstance(json.loads(next(open(task / "train.jsonl")))["label"], float) else "classification"
    pair = "text_pair" in json.loads(next(open(task / "train.jsonl")))
    st.run(out / "results.json",
           st.distill("finetune", "--model", model, "--out", out, "--seeds", a.seeds, f"data.path={task}",
                      "data.validation_split=validation", "data.test_split=test", f"task.kind={kind}",
                      "task.text_column=text", f"task.text_pair_column={'text_pair' if pair else 'null'}",
                      "task.label_column=label", f"training.epochs={a.finetune_epochs}",
                      f"training.learning_rate={a.finetune_lr}", f"data.max_length={a.finetune_length}",
                      f"data.max_train_samples={a.finetune_train_samples or 'null'}", ranks=a.finetune_ranks),
           title)
    return json.loads((out / "results.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("runs/task_agnostic"))
    p.add_argument("--corpus", type=Path, help="a jsonl corpus with a text column and train/validation splits")
    p.add_argument("--tasks", type=Path, help="a directory of task directories (labelled_tasks.py's layout)")
    p.add_argument("--task-names", nargs="*", help="only these tasks of --tasks (default: all)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--block-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--teacher-steps", type=int, default=3000, help="most pretraining steps of each teacher")
    p.add_argument("--teacher-lr", type=float, default=5e-4)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-samples", type=int, default=400, help="validation rows of text (before blocking)")
    p.add_argument("--steps", type=int, default=600, help="the step budget of every student")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per model and task")
    p.add_argument("--finetune-epochs", type=int, default=3)
    # models this small, pretrained from scratch, stay near chance at BERT's 2e-5..1e-4 (a teacher: 58% on
    # review_sentiment at 1e-4, 80% at 1e-3)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--finetune-length", type=int, default=128)
    p.add_argument("--finetune-train-samples", type=int, default=2400,
                   help="training rows drawn at random from a larger task (0: all)")
    p.add_argument("--finetune-ranks", type=int, default=1, help="ranks of each fine-tune")
    p.add_argument("--jobs", type=int, default=2, help="fine-tunes run at once (each on cores / jobs threads)")
    p.add_argument("--kinds", nargs="*", choices=list(FAMILIES), help="only these model kinds (default: both)")
    p.add_argument("--methods", nargs="*", choices=sorted({*ENCODER_METHODS, *SEQ2SEQ_METHODS} - {BASELINE}),
                   help="only these methods, beside the baseline (default: all)")
    a = p.parse_args()
    a.workdir = a.workdir.resolve()
    st = Stages(a.workdir, a.nproc, "task_agnostic")
    corpus, tasks = a.corpus, a.tasks
    if corpus is None:
        corpus = a.workdir / "prose"
        st.run(corpus / "manifest.json", [sys.executable, ROOT / "benchmarks/prose_corpus.py", "--out", corpus,
                                          "--cache", a.workdir / "prose-debs"], "pre-training corpus")
    if tasks is None:
        tasks = a.workdir / "tasks"
        st.run(tasks / "manifest.json", [sys.executable, ROOT / "benchmarks/labelled_tasks.py", "--out", tasks,
                                         "--cache", a.workdir / "task-packages"], "labelled tasks")
    task_dirs = sorted(d for d in tasks.iterdir() if (d / "train.jsonl").is_file())
    if a.task_names:
        unknown = set(a.task_names) - {d.name for d in task_dirs}
        if unknown:
            raise SystemExit(f"task_agnostic: no task {', '.join(sorted(unknown))} in {tasks} "
                             f"(it has {', '.join(d.name for d in task_dirs)})")
        task_dirs = [d for d in task_dirs if d.name in a.task_names]
    tok = a.workdir / "tokenizer"
    st.run(tok / "tokenizer.json", st.distill("train-tokenizer", "--data", corpus, "--out", tok, "--vocab-size", a.vocab,
                                              "--sentinels", 100, "data.source_column=text", "data.target_column=null"),
           "tokenizer")
    models: dict[str, dict[str, Path]] = {}  # kind -> name -> model directory
    for kind, (family, objective, methods) in FAMILIES.items():
        if a.kinds and kind not in a.kinds:
            continue
        teacher = build_teacher(a, st, family, objective, tok, corpus)
        # the floor: what fine-tuning alone makes of the teacher's shape with no pretraining at all
        models[kind] = {"teacher": teacher, NO_PRETRAINING: a.workdir / f"{family}-init"}
        for shape, student in students(a, st, family, teacher).items():
            for method, (recipe, overrides) in methods.items():
                if a.methods and method not in a.methods and method != BASELINE:
                    continue
                out = a.workdir / "runs" / kind / slug(shape) / slug(method)
                st.train(RECIPES / recipe, out, student_overrides(a, shape, method, overrides, student, teacher,
                                                                  text_data(a, corpus, objective)),
                         f"{kind} {shape}: {method}")
                models[kind][f"{shape}: {method}"] = out / "final"
    # fine-tunes are small: several at once, each on its share of the cores, use the machine better than ranks
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (a.jobs * a.finetune_ranks)))
    jobs = {(kind, name, t.name): (path, t) for kind, named in models.items() for name, path in named.items()
            for t in task_dirs}
    with ThreadPoolExecutor(a.jobs) as pool:
        done = {key: pool.submit(finetune, a, st, path, t,
                                 a.workdir / "finetune" / key[0] / slug(key[1].replace(": ", "-")) / t.name,
                                 f"fine-tune {key[0]} {key[1]} on {t.name}")
                for key, (path, t) in jobs.items()}
    scores = {kind: {name: {t.name: done[kind, name, t.name].result() for t in task_dirs} for name in named}
              for kind, named in models.items()}
    sizes = {t.name: {split: sum(1 for _ in open(t / f"{split}.jsonl")) for split in ("train", "validation", "test")}
             for t in task_dirs}
    ce = {kind: {name: _pretraining_ce(path) for name, path in named.items()} for kind, named in models.items()}
    body = report(scores, sizes, ce, st, a)
    print(body)
    append_section("Task-agnostic distillation on real text", body)


def _pretraining_ce(model: Path) -> float | None:
    """The validation CE of the pretraining objective where the model's run measured one (a run's final/ or
    best/ directory; none for a random init)."""
    found = model.parent / "eval_results.json"
    return json.loads(found.read_text())["eval/ce"] if found.is_file() else None


def report(scores: dict, sizes: dict[str, dict[str, int]], ce: dict, st: Stages, a: argparse.Namespace) -> str:
    """One table per model kind: each model's validation CE on its pretraining objective, its mean test score
    per task and over the tasks [95% intervals over seeds], and a student's seed-paired difference from the
    objective alone of its shape."""
    tasks = list(sizes)
    cap = a.finetune_train_samples
    shown = ", ".join(f"{t} {min(n['train'], cap or n['train'])}/{n['validation']}/{n['test']}" for t, n in sizes.items())
    lines = [f"Machine: {machine()}, {a.nproc} ranks; {st.hours():.1f} h of stages. Students: {a.steps} steps each, "
             f"seed {a.seed}; fine-tuning: {a.seeds} seeds, {a.finetune_epochs} epochs at learning rate "
             f"{a.finetune_lr:g}. Tasks (train/validation/test rows): {shown}. Each task cell: the task's main test "
             "metric (accuracy; Pearson for the pair regression), mean [95% Student-t interval] over seeds. "
             "Pretraining CE: the objective's validation CE after pretraining or distillation (for a loss with no "
             "logit term the LM head is never trained, so this CE says nothing of the encoder).", ""]
    for kind, rows in scores.items():
        lines += [f"**{kind}**", "", "| model | pretraining CE | " + " | ".join(tasks) + f" | average | vs {BASELINE} |",
                  "|---|---|" + "---|" * (len(tasks) + 2)]
        for name, by_task in rows.items():
            cells = [_cell(by_task[t]) for t in tasks]
            average = _seed_averages(by_task, tasks)
            shape, _, method = name.rpartition(": ")
            baseline = rows.get(f"{shape}: {BASELINE}")
            gain = "–" if not shape or method == BASELINE or baseline is None else \
                _interval(t_interval([x - y for x, y in zip(average, _seed_averages(baseline, tasks))]), signed=True)
            pre = ce[kind][name]
            lines.append(f"| {name} | {'–' if pre is None else f'{pre:.3f}'} | " + " | ".join(cells)
                         + f" | {_interval(t_interval(average))} | {gain} |")
        lines.append("")
    lines += ["Commands:", "", "```", *st.commands, "```"]
    return "\n".join(lines)


def _seed_averages(by_task: dict, tasks: list[str]) -> list[float]:
    """Each fine-tuning seed's main test metric averaged over the tasks: seed i of every model and task starts
    its head and orders its batches alike, so two models' averages pair up by seed."""
    per_task = [[seed["test"][by_task[t]["main_metric"]] for seed in by_task[t]["seeds"]] for t in tasks]
    return [sum(scores) / len(tasks) for scores in zip(*per_task)]


def _cell(results: dict) -> str:
    return _interval(results["test"][results["main_metric"]])


def _interval(score: dict, signed: bool = False) -> str:
    """mean [low, high] (mean alone for one seed)."""
    form = "+.3f" if signed else ".3f"
    return f"{score['mean']:{form}}" + ("" if score["low"] is None else f" [{score['low']:{form}}, {score['high']:{form}}]")


if __name__ == "__main__":
    main()
