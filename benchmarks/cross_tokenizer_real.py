"""Cross-tokenizer KD on real text (issue 30): does any ``loss.cross_tokenizer`` method beat CE only when the
student was pretrained with its own, substantially different tokenizer? On 2 ranks, with the project's own
commands and launcher, on the docstring corpus (``benchmarks/docstring_corpus.py``) or any summarization data:

1. the teacher on tokenizer A (byte-level BPE, ``--vocab`` tokens): built as ``benchmarks/quality.py`` builds it
   (text-infilling pretraining, then the summaries until its validation CE stops improving), or ``--teacher``;
2. tokenizer B: a Unigram with byte fallback (SentencePiece style) of ``--student-vocab`` tokens on the train
   split. The share of the validation targets' aligned spans that are not one token both vocabularies hold
   must be at least ``--min-split`` (30%), checked before any student trains;
3. two random-init students of the same shape (``--student-layers``, ``--student-d-model``), one per
   tokenizer, each pretrained briefly by text infilling on the train sources with its own tokenizer
   (``--student-pretrain-steps``), so tokens new to B are trained, as a real student's are;
4. from each pretrained student, per seed, the same step budget on the summaries: B by CE only and by each
   cross-tokenizer method of ``METHODS``; A (same tokenizer as the teacher) by CE only and by KD, as the
   reference;
5. validation CE per byte (each run's summed NLL of the validation targets over their UTF-8 bytes, comparable
   across tokenizers) and ROUGE on the test split after greedy generation (``distill evaluate``); the mean
   over seeds with its 95% t-interval, each B method against B's CE only. One table, with the commands.

Every stage leaves a completion marker and is skipped on a rerun with the same settings
(``benchmarks.common.Stages``); an unfinished run continues from its checkpoint.

    python benchmarks/cross_tokenizer_real.py --docstrings --workdir runs/xtok_real [--teacher DIR] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Stages, append_section, machine  # noqa: E402
from distill.files import write_atomic  # noqa: E402
from benchmarks.quality import (RECIPES, build_teacher, data_settings, decoding, infilling_settings,  # noqa: E402
                                teacher_arguments, text_arguments, training)

# B's runs: name -> (recipe, overrides). "published" settings: ULD as Boizard et al. 2024 released it (full CE,
# 1.5 x ULD, temperature 1, every probability); GOLD's ULD defaults in TRL (no CE, temperature 1).
METHODS = {
    "CE only": ("baseline.yaml", []),
    "ULD (project defaults)": ("kd.yaml", ["loss.cross_tokenizer=uld"]),
    "ULD (Boizard et al.: CE + 1.5 ULD, τ = 1)": ("kd.yaml", ["loss.cross_tokenizer=uld", "loss.w_ce=1.0",
                                                               "loss.w_kd=1.5", "loss.temperature=1.0",
                                                               "loss.uld_top_k=null"]),
    "ULD (GOLD defaults: ULD only, τ = 1)": ("kd.yaml", ["loss.cross_tokenizer=uld", "loss.w_ce=0.0",
                                                          "loss.w_kd=1.0", "loss.temperature=1.0"]),
    "hybrid (project defaults)": ("kd.yaml", ["loss.cross_tokenizer=hybrid"]),
    "MinED (mined)": ("kd.yaml", ["loss.cross_tokenizer=mined"]),
    # the conservative candidate: the whole CE, and the teacher only where the comparison is exact (a span of
    # one token both vocabularies hold); no ULD
    "hybrid (full CE, shared spans only)": ("kd.yaml", ["loss.cross_tokenizer=hybrid", "loss.w_ce=1.0",
                                                        "loss.w_kd=1.0", "loss.uld_weight=0.0"]),
}
SAME = {"CE only": ("baseline.yaml", []), "KD (forward KL)": ("kd.yaml", [])}  # A's runs, the reference
T95 = {1: math.nan, 2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def mean_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% t-interval over seeds; nan for one seed)."""
    n = len(values)
    mean = statistics.fmean(values)
    return mean, (T95.get(n, 1.96) * statistics.stdev(values) / math.sqrt(n)) if n > 1 else math.nan


def target_bytes(model: Path, recipe_overrides: list) -> tuple[int, int]:
    """(target tokens the validation CE averages over, the UTF-8 bytes of their text) for ``model``'s tokenizer,
    through the collator the run used (its truncation, special tokens)."""
    from transformers import AutoTokenizer

    from distill.config.parsing import load_config
    from distill.data.collate import Seq2SeqCollator
    from distill.data.loading import load_split
    from distill.data.token_alignment import token_bytes

    tok = AutoTokenizer.from_pretrained(model)
    data = load_config(RECIPES / "baseline.yaml", recipe_overrides).data
    _, targets = Seq2SeqCollator(tok, data, tok.eos_token_id).collate_targets(list(load_split(data, data.eval_split,
                                                                                                "eval")))
    table = token_bytes(tok)
    # the text each example's tokens write, without the leading space a SentencePiece prefix adds
    return sum(map(len, targets)), sum(len(b"".join(table[i] or b"" for i in ids).strip()) for ids in targets)


def split_share(student_tok: Path, teacher_tok: Path, recipe_overrides: list) -> tuple[int, float]:
    """(tokens both vocabularies hold, the share of the validation targets' spans that are not one such token)."""
    from transformers import AutoTokenizer

    from distill.config.parsing import load_config
    from distill.data.collate import Seq2SeqCollator
    from distill.data.loading import load_split
    from distill.data.token_alignment import CrossTokenizerCollator, SharedVocab

    b, a = AutoTokenizer.from_pretrained(student_tok), AutoTokenizer.from_pretrained(teacher_tok)
    data = load_config(RECIPES / "baseline.yaml", recipe_overrides).data
    vocab = SharedVocab.of(b, a, len(b), len(a))
    batch = CrossTokenizerCollator(Seq2SeqCollator(b, data, b.eos_token_id), Seq2SeqCollator(a, data, a.eos_token_id),
                                   vocab)(list(load_split(data, data.eval_split, "eval")))
    return len(vocab.to_teacher), 1.0 - float(batch["span_exact"].mean())


def span_nll(models: dict[str, tuple[Path, str]], student_tok: Path, teacher_tok: Path, recipe_overrides: list,
             batch: int = 64) -> dict[str, dict[str, float]]:
    """Where each model loses its validation CE: its summed NLL per aligned span of the validation targets, averaged
    over the spans that are one token both vocabularies hold ("shared") and over the others ("split"). A span is the
    same text on both sides, so the figures compare across tokenizers. ``models``: name -> (directory, side), the
    side ("A" or "B") saying which tokenization the model reads. Also each kind's span count ("shared_spans")."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from distill.config.parsing import load_config
    from distill.data.collate import Seq2SeqCollator
    from distill.data.loading import load_split
    from distill.data.token_alignment import CrossTokenizerCollator, SharedVocab, teacher_view

    b, t = AutoTokenizer.from_pretrained(student_tok), AutoTokenizer.from_pretrained(teacher_tok)
    data = load_config(RECIPES / "baseline.yaml", recipe_overrides).data
    collate = CrossTokenizerCollator(Seq2SeqCollator(b, data, b.eos_token_id), Seq2SeqCollator(t, data, t.eos_token_id),
                                     SharedVocab.of(b, t, len(b), len(t)))
    rows = list(load_split(data, data.eval_split, "eval"))
    batches = [collate(rows[i:i + batch]) for i in range(0, len(rows), batch)]
    out = {}
    for name, (path, side) in models.items():
        model = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
        sums = {"shared": [0.0, 0], "split": [0.0, 0]}
        for full in batches:
            view = full if side == "B" else teacher_view(full)
            with torch.no_grad():
                logits = model(input_ids=view["input_ids"], attention_mask=view["attention_mask"],
                               decoder_input_ids=view["decoder_input_ids"]).logits
            rows_at = view["target_index"]
            nll = -logits.reshape(-1, logits.shape[-1])[rows_at].log_softmax(-1).gather(
                -1, view["labels"].reshape(-1)[rows_at, None]).squeeze(-1)
            prefix = "" if side == "B" else "teacher."
            per_span = torch.zeros(len(full["span_exact"]), dtype=torch.float64)
            per_span.index_add_(0, torch.arange(len(per_span)), nll[full[prefix + "span_first"]].double())
            per_span.index_add_(0, full[prefix + "span_rest_of"], nll[full[prefix + "span_rest"]].double())
            for kind, mask in (("shared", full["span_exact"] == 1), ("split", full["span_exact"] == 0)):
                sums[kind][0] += float(per_span[mask].sum())
                sums[kind][1] += int(mask.sum())
        out[name] = {**{kind: total / max(n, 1) for kind, (total, n) in sums.items()},
                     **{f"{kind}_spans": n for kind, (_, n) in sums.items()}}
    return out


def pretrained_student(a: argparse.Namespace, st: Stages, data, tok: Path, name: str) -> Path:
    """A random-init BART for ``tok``, pretrained by text infilling on the train sources for a fixed budget."""
    init = a.workdir / f"{name}-init"
    st.run(init / "config.json", st.distill("init-model", "--tokenizer", tok, "--out", init, "--layers",
                                            a.student_layers, "--d-model", a.student_d_model, "--ffn",
                                            4 * a.student_d_model, "--heads", a.heads, "--seed", 0,
                                            "--max-positions", max(a.max_source_length, a.max_target_length) + 2),
           f"random-init student on tokenizer {name}")
    if not a.student_pretrain_steps:
        return init
    run = st.train(RECIPES / "teacher.yaml", a.workdir / f"{name}-pretrain",
                   [f"student.path={init}", *infilling_settings(a, data),
                    *training(a, a.student_pretrain_steps, a.teacher_lr, a.teacher_warmup), "training.eval_every=0"],
                   f"pretrain the student on tokenizer {name} by text infilling")
    return run / "final"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    teacher_arguments(p, Path("runs/xtok_real"))
    text_arguments(p)
    # a Unigram of 2000 tokens splits 33% of the docstring corpus's validation spans against the 8000-token BPE
    # (5000: 21%, 3000: 28%)
    p.add_argument("--student-vocab", type=int, default=2000, help="tokenizer B (Unigram with byte fallback)")
    p.add_argument("--min-split", type=float, default=0.30,
                   help="the least share of validation spans that are not one shared token")
    p.add_argument("--student-layers", type=int, default=2, help="encoder and decoder layers of each student")
    p.add_argument("--student-d-model", type=int, default=256)
    p.add_argument("--student-pretrain-steps", type=int, default=1000,
                   help="each student's infilling steps, at the teacher's learning rate and warmup")
    p.add_argument("--steps", type=int, default=300, help="every student's step budget on the summaries")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=16, help="micro-batch per rank")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", nargs="+", help="only these students (default: all): A0 A1 are tokenizer A's CE only and "
                   "KD, B0 B1 ... tokenizer B's CE only and the cross-tokenizer methods, in METHODS' order")
    p.set_defaults(test_samples=300)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    a = p.parse_args()
    if bool(a.data) == a.docstrings:
        raise SystemExit("cross_tokenizer_real: give --data or --docstrings (one of them)")
    labels = [f"A{i}" for i in range(len(SAME))] + [f"B{i}" for i in range(len(METHODS))]
    if a.runs and not set(a.runs) <= set(labels):
        raise SystemExit(f"cross_tokenizer_real: --runs takes {' '.join(labels)} (got {' '.join(a.runs)})")
    a.workdir = a.workdir.resolve()
    a.seed = a.seeds[0]  # the teacher's and the pretraining stages'
    st = Stages(a.workdir, a.nproc, "cross_tokenizer_real")
    data = a.data
    if a.docstrings:
        data = a.workdir / "data"
        st.run(data / "stats.json", [sys.executable, ROOT / "benchmarks/docstring_corpus.py", "--out", data],
               "the docstring corpus")
    teacher = Path(a.teacher).resolve() if a.teacher else build_teacher(a, st, data)
    tok_b = a.workdir / "tokenizer-b"
    st.run(tok_b / "tokenizer.json", st.distill("train-tokenizer", "--data", data, "--out", tok_b, "--vocab-size",
                                                a.student_vocab, "--kind", "unigram",
                                                f"data.source_column={a.source_column}",
                                                f"data.target_column={a.target_column}"), "tokenizer B (Unigram)")
    examples = a.steps * a.batch * a.nproc  # every student reads the same examples, each once
    settings = data_settings(a, data, examples)
    shared, split = split_share(tok_b, teacher, settings)
    if split < a.min_split:
        raise SystemExit(f"cross_tokenizer_real: only {split:.1%} of the validation spans are not one shared token "
                         f"(--min-split {a.min_split:.0%}): use another --student-vocab")
    students = {"A": pretrained_student(a, st, data, teacher, "A"), "B": pretrained_student(a, st, data, tok_b, "B")}

    runs: dict[tuple[str, str], list[Path]] = {}  # (tokenizer, method) -> one run per seed
    for side, methods in (("A", SAME), ("B", METHODS)):
        for method, (recipe, extra) in methods.items():
            label = f"{side}{list(methods).index(method)}"
            if a.runs and label not in a.runs:
                continue
            slug = f"{label}-" + method.split(" (")[0].lower().replace(" ", "-")
            for seed in a.seeds:
                teacher_setting = [f"teacher.path={teacher}"] if recipe == "kd.yaml" else []
                run = st.train(RECIPES / recipe, a.workdir / "runs" / f"{slug}-s{seed}",
                               [f"student.path={students[side]}", *teacher_setting, *settings,
                                *training(a, a.steps, a.lr), f"training.seed={seed}", "training.eval_every=0", *extra],
                               f"student {side}, {method}, seed {seed}")
                runs.setdefault((side, method), []).append(run)

    results = a.workdir / "eval"
    cmd = st.distill("evaluate", "--data", data, "--split", "test", "--source-column", a.source_column,
                     "--target-column", a.target_column, *decoding(a), "--max-source-length", a.max_source_length,
                     "--max-samples", a.test_samples, "--out", results, "--model", teacher, "--model-name", "teacher")
    for (side, method), paths in runs.items():
        for path in paths:
            cmd += ["--model", path / "final", "--model-name", path.name]
    st.run(results / "results.json", cmd, "evaluate the teacher and every student on the test split")
    rouge = json.loads((results / "results.json").read_text())
    per_byte = {}
    for tok_dir, side in ((teacher, "A"), (tok_b, "B")):
        tokens, size = target_bytes(tok_dir, settings)
        per_byte[side] = tokens / size  # CE per token x tokens per byte
    # computed in this process, once per model: a rerun with more --runs adds only the new ones
    spans_file = results / "spans.json"
    spans = json.loads(spans_file.read_text()) if spans_file.exists() else {}
    models = {"teacher": (teacher, "A")}
    models.update({path.name: (path / "final", side) for (side, _), paths in runs.items() for path in paths})
    missing = {name: model for name, model in models.items() if name not in spans}
    if missing:
        spans.update(span_nll(missing, tok_b, teacher, settings))
        write_atomic(spans_file, json.dumps(spans, indent=1))
    body = report(a, st, runs, rouge, per_byte, shared, split, teacher, spans)
    print(body)
    if not a.no_write:
        append_section("Cross-tokenizer KD on real text", body)


def report(a: argparse.Namespace, st: Stages, runs: dict, rouge: dict, per_byte: dict, shared: int, split: float,
           teacher: Path, spans: dict) -> str:
    def ce_byte(side: str, run: Path) -> float:
        return json.loads((run / "eval_results.json").read_text())["eval/ce"] * per_byte[side]

    def sec_per_step(run: Path) -> float:
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return statistics.fmean(r["perf/sec_per_step"] for r in logged if "perf/sec_per_step" in r)

    rows, base = [], None
    for (side, method), paths in runs.items():
        ce, ce_w = mean_interval([ce_byte(side, r) for r in paths])
        r2, r2_w = mean_interval([rouge[r.name]["rouge2"] for r in paths])
        rl, rl_w = mean_interval([rouge[r.name]["rougeL"] for r in paths])
        if side == "B" and method == "CE only":
            base = [ce_byte(side, r) for r in paths]
        gap = ""
        if side == "B" and method != "CE only" and base is not None:
            diff, diff_w = mean_interval([ce_byte(side, r) - b for r, b in zip(paths, base)])  # paired by seed
            gap = f"{diff:+.4f} ± {diff_w:.4f}"
        sh, sh_w = mean_interval([spans[r.name]["shared"] for r in paths])
        sp, sp_w = mean_interval([spans[r.name]["split"] for r in paths])
        label = f"{side}{list(SAME if side == 'A' else METHODS).index(method)}"  # as --runs names it
        rows.append(f"| {label} | {method} | {ce:.4f} ± {ce_w:.4f} | {gap} | {sh:.3f} ± {sh_w:.3f} | "
                    f"{sp:.3f} ± {sp_w:.3f} | {r2:.2f} ± {r2_w:.2f} | {rl:.2f} ± {rl_w:.2f} | "
                    f"{statistics.fmean(map(sec_per_step, paths)):.2f} |")
    t = rouge["teacher"]
    return (f"Machine: {machine()}; {st.hours():.1f} h from the first stage's end to the last's. Data: "
            f"{'the docstring corpus (benchmarks/docstring_corpus.py)' if a.docstrings else a.data}. Teacher "
            f"({teacher.name}): tokenizer A, ROUGE-2 {t['rouge2']:.2f}, ROUGE-L {t['rougeL']:.2f} on the same test "
            f"examples. Tokenizer B: Unigram with byte fallback, {a.student_vocab} tokens; {shared} tokens in both "
            f"vocabularies; {split:.1%} of the validation targets' spans are not one shared token. Students: "
            f"{a.student_layers}+{a.student_layers} layers, d_model {a.student_d_model}, random-init and pretrained "
            f"by text infilling for {a.student_pretrain_steps} steps with their own tokenizer; then {a.steps} steps "
            f"on the summaries, learning rate {a.lr}, micro-batch {a.batch} on each of {a.nproc} ranks, seeds "
            f"{' '.join(map(str, a.seeds))}. Validation CE per byte: the run's validation CE per token × its "
            f"tokens per byte (A {per_byte['A']:.3f}, B {per_byte['B']:.3f}); ROUGE F1 × 100 on "
            f"{a.test_samples} test examples, greedy, no repeated {a.no_repeat_ngram_size}-grams. Each cell: the "
            "mean over seeds ± the half-width of its 95% t-interval; the gap is paired by seed.\n\n"
            "NLL / span: the summed NLL of a validation span's tokens, averaged over the spans that are one shared "
            "token (shared) and over the others (split); a span is the same text on both sides, so these compare "
            f"across tokenizers. The teacher: {spans['teacher']['shared']:.3f} per shared span, "
            f"{spans['teacher']['split']:.3f} per split span.\n\n"
            "| run (A: tokenizer A, B: tokenizer B) | student | validation CE / byte | vs B's CE only | NLL / shared span | NLL / split span | "
            "ROUGE-2 | ROUGE-L | s / step |\n"
            "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
            + "\n\nCommands, in order:\n\n```\n" + "\n".join(st.commands) + "\n```")


if __name__ == "__main__":
    main()
