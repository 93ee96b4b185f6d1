"""Shleifer & Rush's comparison of SFT, KD and pseudo-labels ("Pre-trained Summarization Distillation",
2020), in miniature, on any summarization dataset the trainer reads, with the project's own commands and
launcher (2 ranks):

1. without ``--teacher``: a tokenizer trained on the train split (``distill train-tokenizer``) and a random-init
   BART (``distill init-model``), pretrained as BART is, by text infilling (``data.objective=infilling``, blocks
   of ``--max-source-length`` tokens) on the train split's sources (``--pretrain-steps``), then trained on the summaries; both until their validation CE stops improving
   (``training.early_stopping_patience``); the teacher is the second one's best checkpoint (``best/``).
   Without the pretraining the summaries alone never taught it to read: on the docstring corpus its
   encoder's output became the same for every source and it wrote one summary for all (BENCHMARKS.md).
   The teacher must write distinct summaries for at least ``--min-distinct`` of 64 validation sources (one that
   ignores its source teaches nothing), checked before any student;
2. students by layer copy (``distill make-student``): the decoder halved, and ``--second-depth`` layers;
3. each student trained with the same step budget and seed by SFT (gold summaries, CE), KD (the distilBART
   recipe: 0.2·CE + 0.8·τ²·KL, τ = 2), PL (``distill pseudo-label``: the teacher's summaries), PL filtered
   (labels under ``--min-rouge2`` ROUGE-2 against gold dropped) and KD + hidden states (3·MSE of
   each student decoder layer against the teacher layer it was copied from);
4. ``distill evaluate`` of the teacher and every student on the same test examples: ROUGE-1/2/L with
   bootstrap 95% intervals, ms per example and speed-up; one table, with the commands, to BENCHMARKS.md.

Every stage leaves a marker of completion (a finished run's ``eval_results.json``, a dataset's index file,
a result file); a rerun skips finished stages and continues unfinished runs from their checkpoints. A finished
stage made with other settings (another ``--steps``, another teacher) stops the rerun with one line.

    python benchmarks/quality.py --data DIR --workdir runs/quality [--teacher DIR] [--steps 1500] ...
    python benchmarks/quality.py --docstrings --workdir runs/quality   # the corpus of benchmarks/docstring_corpus.py

The defaults are sized for a few hours on 2 CPU cores with the docstring corpus: a 4-4, d_model 256 teacher
at 128 source tokens takes about 1.5 s per 32-example step there (BENCHMARKS.md has the run's settings).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Stages, append_section, machine  # noqa: E402

RECIPES = ROOT / "recipes" / "demo"
METHODS = {  # name -> (recipe, overrides); PL runs read their own dataset
    "SFT": ("baseline.yaml", []),
    "KD": ("kd.yaml", []),
    "PL": ("baseline.yaml", []),
    "PL filtered": ("baseline.yaml", []),  # labels under --min-rouge2 against gold dropped
    "KD + hidden": ("kd.yaml", ["loss.w_hid=3.0", "loss.hidden.map=copied", "loss.hidden.stacks=decoder"]),
}


def data_settings(a: argparse.Namespace, path, train_samples: int | None = None) -> list[str]:
    return [f"data.path={path}", f"data.source_column={a.source_column}", f"data.target_column={a.target_column}",
            f"data.max_source_length={a.max_source_length}", f"data.max_target_length={a.max_target_length}",
            f"data.max_train_samples={train_samples or 'null'}", f"data.max_eval_samples={a.eval_samples}",
            "data.train_split=train",
            "data.eval_split=validation"]


def infilling_settings(a: argparse.Namespace, data) -> list[str]:
    """BART's own pre-training on the train split's sources: text infilling in blocks of the source length."""
    return [f"data.path={data}", f"data.source_column={a.source_column}", "data.target_column=null",
            "data.objective=infilling", f"data.block_length={a.max_source_length}", "data.max_train_samples=null",
            f"data.max_eval_samples={a.eval_samples}", "data.train_split=train", "data.eval_split=validation"]


def training(a: argparse.Namespace, steps: int, lr: float, warmup: int | None = None) -> list[str]:
    warmup = max(1, steps // 20) if warmup is None else min(warmup, steps)
    return [f"training.max_steps={steps}", f"training.learning_rate={lr}", f"training.micro_batch_size={a.batch}",
            f"training.seed={a.seed}", f"training.warmup_steps={warmup}", "training.log_every=50",
            f"training.save_every={a.eval_every}", "eval.generate=false"]


def decoding(a: argparse.Namespace) -> list:
    """Every model's generation settings: greedy, as the models' configs say, without repeated n-grams."""
    return ["--max-new-tokens", a.max_new_tokens, "--no-repeat-ngram-size", a.no_repeat_ngram_size]


def build_teacher(a: argparse.Namespace, st: Stages, data) -> Path:
    w = a.workdir
    tok, init = w / "tokenizer", w / "teacher-init"
    st.run(tok / "tokenizer.json", st.distill("train-tokenizer", "--data", data, "--out", tok, "--vocab-size", a.vocab,
                                              f"data.source_column={a.source_column}",
                                              f"data.target_column={a.target_column}"), "tokenizer")
    st.run(init / "config.json", st.distill("init-model", "--tokenizer", tok, "--out", init, "--layers",
                                            a.teacher_layers, "--d-model", a.d_model, "--ffn", 4 * a.d_model,
                                            "--heads", a.heads, "--seed", a.seed,
                                            "--max-positions", max(a.max_source_length, a.max_target_length) + 2),
           "random-init teacher")
    until_best = [f"training.eval_every={a.eval_every}", "eval.best_metric=eval/ce",
                  f"training.early_stopping_patience={a.patience}"]
    if a.pretrain_steps:  # BART's own objective on the train split's sources (distill.data.objectives)
        pre = st.train(RECIPES / "teacher.yaml", w / "pretrain", [f"student.path={init}", *infilling_settings(a, data),
                                                        *training(a, a.pretrain_steps, a.teacher_lr, a.teacher_warmup),
                                                        *until_best],
                       "pretrain the teacher by text infilling until its validation CE stops improving")
        init = pre / "best"
    run = st.train(RECIPES / "teacher.yaml", w / "teacher", [f"student.path={init}", *data_settings(a, data),
                                                   *training(a, a.teacher_max_steps, a.teacher_lr, a.teacher_warmup),
                                                   *until_best],
                   "train the teacher on the summaries until its validation CE stops improving")
    return run / "best"


def teacher_arguments(p: argparse.ArgumentParser, workdir: Path) -> None:
    """The data and the teacher's settings, shared by the benchmarks that build a teacher as this one does."""
    p.add_argument("--data", help="hub dataset, directory or data file with train, validation and test splits")
    p.add_argument("--docstrings", action="store_true", help="build and use the docstring corpus in the workdir")
    p.add_argument("--workdir", type=Path, default=workdir)
    p.add_argument("--source-column", default="document")
    p.add_argument("--target-column", default="summary")
    p.add_argument("--teacher", help="a trained teacher; without it one is built from the data")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--teacher-lr", type=float, default=5e-4)
    # BART is post-LN: from scratch it needs a long warmup (Xiong et al., 2020). At 1e-3 after 25 warmup steps,
    # within 200 steps the encoder's feed-forward output became one vector, 3.2x the layer's input and the same
    # for every token, and nothing of the source reached the decoder again (BENCHMARKS.md)
    p.add_argument("--teacher-warmup", type=int, default=250, help="warmup steps of each teacher stage")
    p.add_argument("--pretrain-steps", type=int, default=2000,
                   help="most steps of the teacher's text-infilling pretraining (0: none)")
    p.add_argument("--teacher-max-steps", type=int, default=20000)
    p.add_argument("--patience", type=int, default=3, help="evaluations without a better validation CE")
    p.add_argument("--eval-every", type=int, default=200)


def text_arguments(p: argparse.ArgumentParser) -> None:
    """Lengths, the validation and test samples and the decoding, shared likewise."""
    p.add_argument("--max-source-length", type=int, default=128)
    p.add_argument("--max-target-length", type=int, default=48)
    p.add_argument("--eval-samples", type=int, default=512, help="validation examples per evaluation")
    p.add_argument("--test-samples", type=int, help="test examples (default: the whole split)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--no-repeat-ngram-size", type=int, default=3, help="as BART's summarization models generate")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    teacher_arguments(p, Path("runs/quality"))
    p.add_argument("--second-depth", type=int, default=1, help="decoder layers of the second student")
    p.add_argument("--steps", type=int, default=600, help="every student's step budget")
    p.add_argument("--lr", type=float, default=5e-4, help="every student's learning rate")
    p.add_argument("--batch", type=int, default=16, help="micro-batch per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-rouge2", type=float, default=10.0, help="PL filter: drop labels under this ROUGE-2")
    text_arguments(p)
    p.add_argument("--min-distinct", type=float, default=0.5,
                   help="the least share of distinct teacher summaries on validation sources to go on to the students")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    a = p.parse_args()
    if bool(a.data) == a.docstrings:
        raise SystemExit("quality: give --data or --docstrings (one of them)")
    a.workdir = a.workdir.resolve()
    # every student reads the same examples, each once, and the teacher labels only those for PL
    a.student_examples = a.steps * a.batch * a.nproc
    st = Stages(a.workdir, a.nproc, "quality")
    data = a.data
    if a.docstrings:
        data = a.workdir / "data"
        st.run(data / "stats.json", [sys.executable, ROOT / "benchmarks/docstring_corpus.py", "--out", data],
               "the docstring corpus")
    teacher = Path(a.teacher).resolve() if a.teacher else build_teacher(a, st, data)
    check = a.workdir / "teacher-check.jsonl"  # before any student: a teacher that ignores its source teaches nothing
    st.run(None, st.distill("generate", "--model", teacher, "--data", data, "--split", "validation", "--out", check,
                            "--source-column", a.source_column, *decoding(a),
                            "--max-source-length", a.max_source_length, "--max-samples", 64),
           "the teacher's summaries of 64 validation sources")
    share = distinct_share(check)
    if share < a.min_distinct:
        raise SystemExit(f"quality: the teacher ({teacher}) writes {share:.0%} distinct summaries for 64 validation "
                         f"sources (--min-distinct {a.min_distinct}): it has not learned to read its source; train it "
                         "longer (--teacher-max-steps, --patience, --teacher-lr) or give --teacher")

    depths = {}
    for layers in (None, a.second_depth):
        out = a.workdir / "students" / ("half" if layers is None else f"d{layers}")
        cmd = st.distill("make-student", teacher, out)
        if layers is not None:
            cmd += ["--decoder-layers", layers]
        else:  # the decoder halved
            config = json.loads((teacher / "config.json").read_text())
            layers = max(1, config["decoder_layers"] // 2)
            cmd += ["--decoder-layers", layers]
        st.run(out / "config.json", cmd, f"student with {layers} decoder layers (layer copy)")
        depths[layers] = out

    pl = a.workdir / "pl"
    generation = ["--split", "train", "--source-column", a.source_column, "--target-column", a.target_column,
                  *decoding(a), "--max-source-length", a.max_source_length,
                  "--max-samples", a.student_examples]
    st.run(pl / "pseudo_label.json", st.distill("pseudo-label", "--model", teacher, "--data", data, "--out", pl,
                                                *generation, ranks=a.nproc), "pseudo-labels")
    pl_r2 = a.workdir / "pl-rouge2"
    if not (pl_r2 / "pseudo_label.json").exists():  # the same generations, filtered
        shutil.rmtree(pl_r2, ignore_errors=True)
        shutil.copytree(pl, pl_r2)
        (pl_r2 / "pseudo_label.json").unlink()
    st.run(pl_r2 / "pseudo_label.json", st.distill("pseudo-label", "--model", teacher, "--data", data, "--out", pl_r2,
                                                   *generation, "--min-rouge2", a.min_rouge2, "--below", "drop",
                                                   ranks=a.nproc), "pseudo-labels, ROUGE-2 filter")

    students = {}
    for layers, init in depths.items():
        for method, (recipe, extra) in METHODS.items():
            source = pl if method == "PL" else pl_r2 if method == "PL filtered" else data
            name = f"{method} ({layers}-layer decoder)"
            slug = method.lower().replace(" + ", "-").replace(" ", "-") + f"-d{layers}"
            teacher_setting = [f"teacher.path={teacher}"] if recipe == "kd.yaml" else []
            run = st.train(RECIPES / recipe, a.workdir / "runs" / slug,
                           [f"student.path={init}", *teacher_setting, *data_settings(a, source, a.student_examples),
                            *training(a, a.steps, a.lr),
                            "training.eval_every=0", *extra], f"student: {name}")
            students[slug] = (name, run / "final")

    results = a.workdir / "eval"
    models = {"teacher": ("teacher", teacher), **students}  # file-safe name -> (name in the table, model)
    cmd = st.distill("evaluate", "--data", data, "--split", "test", "--source-column", a.source_column,
                     "--target-column", a.target_column, *decoding(a),
                     "--max-source-length", a.max_source_length, "--out", results)
    for slug, (_, path) in models.items():
        cmd += ["--model", path, "--model-name", slug]
    if a.test_samples:
        cmd += ["--max-samples", a.test_samples]
    st.run(results / "results.json", cmd, "evaluate every model on the test split")
    rows = {models[slug][0]: {**row, "distinct": distinct_share(results / f"{slug}.jsonl")}
            for slug, row in json.loads((results / "results.json").read_text()).items()}
    gaps = paired_gaps(per_example_scores(results, {name: slug for slug, (name, _) in students.items()}, data, a),
                       "SFT")
    body = report(rows, gaps, st.commands, a, st.hours())
    print(body)
    if not a.no_write:
        append_section("Quality: SFT, KD and pseudo-labels on real text", body)


def _cell(row: dict, key: str) -> str:
    return f"{row[key]:.2f} [{row[key + '_low']:.2f}, {row[key + '_high']:.2f}]"


def ranking(rows: dict) -> list[str]:
    """Per student depth, the methods by ROUGE-2, and which of them the best one's interval separates."""
    lines = []
    depths = sorted({name.rsplit("(", 1)[1] for name in rows if "(" in name})
    for depth in depths:
        group = sorted(((n, r) for n, r in rows.items() if n.endswith("(" + depth)), key=lambda x: -x[1]["rouge2"])
        (best, top), rest = group[0], group[1:]
        apart = [n.rsplit(" (", 1)[0] for n, r in rest if r["rouge2_high"] < top["rouge2_low"]]
        close = [n.rsplit(" (", 1)[0] for n, r in rest if r["rouge2_high"] >= top["rouge2_low"]]
        lines.append(f"- Students with a {depth.rstrip(')')}: {best.rsplit(' (', 1)[0]} has the best ROUGE-2 "
                     f"({top['rouge2']:.2f}); its 95% interval is above "
                     f"{', '.join(apart) if apart else 'none of the others'}"
                     + (f", and overlaps {', '.join(close)}" if close else "") + ".")
    return lines


def read_predictions(path: Path) -> dict[int, str]:
    return {r["id"]: r["prediction"] for r in map(json.loads, path.read_text().splitlines())}


def distinct_share(path: Path) -> float:
    """The share of distinct texts among a model's predictions: near 0 when it writes one summary for every source."""
    predictions = read_predictions(path)
    return len(set(predictions.values())) / max(1, len(predictions))


def per_example_scores(results: Path, slugs: dict[str, str], data, a: argparse.Namespace) -> dict[str, list[dict]]:
    """Per model (name in the table -> its slug), ROUGE of each test example, in the examples' order."""
    from distill.infer.evaluate import rouge_scores
    from distill.infer.generate import read_examples

    examples = read_examples(str(data), "test", a.source_column, a.target_column, max_samples=a.test_samples)
    scores = {}
    for name, slug in slugs.items():
        prediction = read_predictions(results / f"{slug}.jsonl")
        scores[name] = rouge_scores([prediction[e.id] for e in examples], [e.target for e in examples])
    return scores


def paired_gaps(scores: dict[str, list[dict]], baseline: str, samples: int = 1000) -> dict[str, dict]:
    """Each student's ROUGE minus that of the same-depth ``baseline`` method on the same examples: a paired
    bootstrap, far tighter than comparing two models' own intervals (the examples' difficulty cancels)."""
    from distill.infer.evaluate import bootstrap

    gaps = {}
    for name, rows in scores.items():
        method, depth = name.rsplit(" (", 1)
        base = scores.get(f"{baseline} ({depth}")
        if method != baseline and base is not None:
            gaps[name] = bootstrap([{k: r[k] - b[k] for k in ("rouge1", "rouge2", "rougeL")} for r, b in zip(rows, base)],
                                   samples=samples)
    return gaps


def gap_lines(gaps: dict[str, dict], baseline: str) -> list[str]:
    """Per student, its ROUGE-2 gain over the baseline with the 95% interval, and whether it is a win, a loss or a tie."""
    lines = []
    for name, gap in gaps.items():
        low, mid, high = (gap["rouge2"][k] for k in ("low", "mid", "high"))
        verdict = "better than" if low > 0 else "worse than" if high < 0 else "not separable from"
        lines.append(f"- {name}: ROUGE-2 {mid:+.2f} [{low:+.2f}, {high:+.2f}] against {baseline}: {verdict} {baseline}.")
    return lines


def report(rows: dict, gaps: dict, commands: list[str], a: argparse.Namespace, hours: float) -> str:
    lines = ["| model | ROUGE-1 | ROUGE-2 | ROUGE-L | distinct outputs | ms / example | speed-up | params (M) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {_cell(row, 'rouge1')} | {_cell(row, 'rouge2')} | {_cell(row, 'rougeL')} | "
                     f"{row['distinct']:.0%} | {row['ms_per_example']:.1f} | {row['speedup']:.2f}x | {row['params_m']:.1f} |")
    n = next(iter(rows.values()))["n"]
    return (f"Machine: {machine()}; {hours:.1f} h from the first stage's end to the last's. Data: "
            f"{'the docstring corpus (benchmarks/docstring_corpus.py)' if a.docstrings else a.data}; {n} test "
            f"examples, greedy decoding without repeated {a.no_repeat_ngram_size}-grams, at most {a.max_new_tokens} new "
            "tokens; ROUGE F1 × 100 with bootstrap 95% "
            f"intervals. Every student: {a.steps} steps, learning rate {a.lr}, seed {a.seed}, micro-batch {a.batch} "
            f"on each of {a.nproc} ranks.\n\n" + "\n".join(lines) + "\n\n" + "\n".join(ranking(rows))
            + "\n\nEach method against SFT at the same depth, paired over the same test examples (bootstrap 95% "
            "interval of the difference):\n\n" + "\n".join(gap_lines(gaps, "SFT"))
            + "\n\nCommands, in order:\n\n```\n" + "\n".join(commands) + "\n```")


if __name__ == "__main__":
    main()
