"""Cross-tokenizer KD on the demo, on 2 CPU ranks (gloo), teacher and student under ZeRO-3, with the
project's own launcher: the demo's trained teacher keeps its byte-level BPE (tokenizer A); the student
is the demo's student with a new vocabulary, a Unigram with byte fallback trained on the demo's training
split (tokenizer B: SentencePiece-style pieces, other merges, ``▁`` for spaces).

The B student is the demo's ``student-init`` (the teacher's encoder and half its decoder layers) with its
embeddings (tied to the LM head) replaced by freshly initialised rows for B's vocabulary. It trains with
the demo's KD recipe (``recipes/demo/kd.yaml``: the same data, steps and weights) three ways: CE only,
``loss.cross_tokenizer=uld`` and ``loss.cross_tokenizer=hybrid``. Validation CE is per token of each
student's own tokenizer, so B's runs compare with each other; beside them, the demo's own same-tokenizer
KD and baseline, and each gain relative to its baseline.

    python benchmarks/cross_tokenizer.py --demo runs/demo [--vocab 1000] [--workdir /tmp/bench_xtok]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_section, machine  # noqa: E402
from benchmarks.teacher_cache import train  # noqa: E402

KD = ROOT / "recipes/demo/kd.yaml"


def student_with_vocabulary(student: Path, tokenizer_dir: Path, out: Path) -> Path:
    """``student`` with its embeddings (tied to its LM head) rebuilt for ``tokenizer_dir``'s vocabulary, every
    other weight kept. A token whose text the old vocabulary holds keeps that row; any other token starts as
    the mean of the rows of the old tokenizer's pieces of its text (a common vocabulary-transfer init); special
    tokens keep the row of the old special with the same role. BART's final_logits_bias starts at 0."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from distill.data.token_alignment import token_bytes

    old_tok, tok = AutoTokenizer.from_pretrained(student), AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(student)
    old = model.get_input_embeddings().weight.detach().clone()
    size = -(-len(tok) // 8) * 8
    model.resize_token_embeddings(size)
    rows = model.get_input_embeddings().weight.data
    rows.normal_(0.0, model.config.init_std)
    by_text = {text: i for i, text in enumerate(token_bytes(old_tok)) if text is not None}
    for i, text in enumerate(token_bytes(tok)):
        if text is None:
            continue
        pieces = [by_text[text]] if text in by_text else \
            old_tok(text.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        rows[i] = old[pieces].mean(0)
    for role in ("bos_token_id", "pad_token_id", "eos_token_id", "unk_token_id", "mask_token_id"):
        if getattr(tok, role, None) is not None and getattr(old_tok, role, None) is not None:
            rows[getattr(tok, role)] = old[getattr(old_tok, role)]
    if hasattr(model, "final_logits_bias"):
        model.final_logits_bias.zero_()
    model.generation_config.suppress_tokens = list(range(len(tok), size)) or None
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def span_statistics(demo: Path, tok_b: Path) -> tuple[int, float]:
    """(tokens both vocabularies hold, the share of the validation targets' spans that are one such token)."""
    from transformers import AutoTokenizer

    from distill.config.parsing import load_config
    from distill.data.collate import Seq2SeqCollator
    from distill.data.loading import load_split
    from distill.data.token_alignment import CrossTokenizerCollator, SharedVocab

    a, b = AutoTokenizer.from_pretrained(demo / "teacher/final"), AutoTokenizer.from_pretrained(tok_b)
    data = load_config(KD, [f"data.path={demo / 'data'}"]).data
    vocab = SharedVocab.of(b, a, len(b), len(a))
    batch = CrossTokenizerCollator(Seq2SeqCollator(b, data, b.eos_token_id), Seq2SeqCollator(a, data, a.eos_token_id),
                                   vocab)(list(load_split(data, data.eval_split, "eval")))
    return len(vocab.to_teacher), float(batch["span_exact"].mean())


def run(recipe: Path, overrides: list, out: Path) -> dict:
    done = out / "result.json"
    if not done.exists():
        result = train(recipe, overrides, out)
        done.write_text(json.dumps(result))
    return json.loads(done.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="the work directory of a finished `distill demo`")
    parser.add_argument("--vocab", type=int, default=1200, help="tokenizer B's vocabulary")
    parser.add_argument("--kind", choices=("unigram", "bpe"), default="bpe", help="tokenizer B's kind")
    parser.add_argument("--kd", default="",
                        help="overrides of the cross-tokenizer KD runs, on top of the demo's KD recipe")
    parser.add_argument("--hybrid", default="", help="overrides of the hybrid run only, on top of --kd")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_xtok"))
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    import datasets

    from distill.models.from_scratch import train_tokenizer

    demo, work = args.demo.resolve(), args.workdir.resolve()
    for needed in (demo / "teacher/final", demo / "student-init", demo / "kd/eval_results.json",
                   demo / "baseline/eval_results.json"):
        if not needed.exists():
            raise SystemExit(f"cross_tokenizer: {needed} is missing: run `distill demo --workdir {demo}` first")
    start = time.time()
    tok_b = work / f"tokenizer-{args.kind}-{args.vocab}"
    if not (tok_b / "tokenizer.json").exists():
        # another sample of the corpus than tokenizer A's (every other training example): other merges and ids
        train_rows = datasets.load_dataset(str(demo / "data"), split="train")
        train_rows = train_rows.select(range(1, len(train_rows), 2))
        train_tokenizer([r[k] for r in train_rows for k in ("document", "summary")], tok_b, args.vocab, args.kind)
    student = work / f"student-{args.kind}-{args.vocab}"
    if not (student / "config.json").exists():
        student_with_vocabulary(demo / "student-init", tok_b, student)
    pair = [f"teacher.path={demo / 'teacher/final'}", f"student.path={student}", f"data.path={demo / 'data'}",
            "eval.generate=false", "training.export=false"]
    runs = {"CE only": ("baseline", ["loss.w_ce=1.0", "loss.w_kd=0.0"]),
            "KD, ULD": ("uld", ["loss.cross_tokenizer=uld", *args.kd.split()]),
            "KD, hybrid (shared-vocabulary KL + ULD)": ("hybrid", ["loss.cross_tokenizer=hybrid", *args.kd.split(),
                                                                  *args.hybrid.split()])}
    # a finished run with the same settings is reused
    tag = lambda overrides: hashlib.sha256(" ".join(overrides).encode()).hexdigest()[:8]  # noqa: E731
    results = {name: run(KD, [*pair, *overrides], work / f"{args.kind}-{args.vocab}-{out}-{tag(overrides)}")
               for name, (out, overrides) in runs.items()}
    same = {name: json.loads((demo / d / "eval_results.json").read_text())["eval/ce"]
            for name, d in (("KD", "kd"), ("CE only", "baseline"))}
    b_base = results["CE only"]["eval_ce"]
    lines = ["| tokenizers | student | validation CE (per own token) | vs its CE-only baseline | s / step |",
             "|---|---|---|---|---|",
             f"| A → A (same, the demo's) | KD (forward KL) | {same['KD']:.4f} | "
             f"{(same['KD'] - same['CE only']) / same['CE only']:+.1%} | |",
             f"| A → A (same, the demo's) | CE only | {same['CE only']:.4f} | | |"]
    for name, r in results.items():
        gain = "" if name == "CE only" else f"{(r['eval_ce'] - b_base) / b_base:+.1%}"
        lines.append(f"| A → B | {name} | {r['eval_ce']:.4f} | {gain} | {r['sec_per_step']:.3f} |")
    from transformers import AutoTokenizer

    sizes = {k: len(AutoTokenizer.from_pretrained(p)) for k, p in (("A", demo / "teacher/final"), ("B", tok_b))}
    shared, exact = span_statistics(demo, tok_b)
    kd = f" with `{args.kd}`" if args.kd else ""
    body = (f"Machine: {machine()}. Command: `python benchmarks/cross_tokenizer.py --demo {args.demo} --kind {args.kind} "
            f"--vocab {args.vocab}" + (f" --kd \"{args.kd}\"" if args.kd else "")
            + (f" --hybrid \"{args.hybrid}\"" if args.hybrid else "") + f"` ({time.time() - start:.0f} s). "
            f"Teacher: the demo's trained 4-4 BART on tokenizer A (byte-level BPE, {sizes['A']} tokens, trained on the "
            f"demo's training split). Students: the demo's 4-2 `student-init` on tokenizer A, and the same layers on "
            f"tokenizer B ({'byte-level BPE' if args.kind == 'bpe' else 'Unigram with byte fallback'}, {sizes['B']} "
            f"tokens, trained on every other training example: other merges, other ids; {shared} tokens in both "
            f"vocabularies, {exact:.1%} of the validation targets' spans one shared token), its embeddings carried over "
            "by token text (a word B splits starts as the mean of A's rows for its pieces). Every run is "
            "`recipes/demo/kd.yaml` (256 examples, 80 steps, τ = 2, 0.2·CE + 0.8·KD, 2 ranks under ZeRO-3)"
            f"{kd}; the CE-only runs set w_kd = 0.\n\n" + "\n".join(lines))
    print(body)
    if not args.no_write:
        append_section("Cross-tokenizer KD on the demo: ULD and hybrid against CE only", body)


if __name__ == "__main__":
    main()
