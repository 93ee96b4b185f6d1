"""Generation speed: a 12-6 student (layer copy of a 12-12 teacher, as distilBART) against its teacher,
and the project's generate path against plain ``model.generate`` one example at a time.

Both models are random-init at the chosen width (nothing can be downloaded here), so every output is
forced to the same length (min = max new tokens): each model does exactly the same decoding work.
Two regimes: latency (one example at a time, as the paper's per-example latency) and throughput
(length-sorted batches through ``distill.infer.generate``).

    python benchmarks/generation.py [--d-model 1024 --heads 16 --ffn 4096 --vocab 50265] [--examples 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_section, machine  # noqa: E402
from distill.infer.generate import generate_batch, generation_config_for, length_sorted_batches  # noqa: E402
from distill.infer.inputs import GenerateSettings  # noqa: E402


def build(tmp: Path, args) -> tuple[Path, Path]:
    from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from distill.models.make_student import make_student

    vocab = {f"w{i}": i for i in range(args.vocab)}
    for i, special in enumerate(("<s>", "<pad>", "</s>", "<unk>")):
        vocab.pop(f"w{i}")
        vocab[special] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    torch.manual_seed(0)
    config = BartConfig(vocab_size=args.vocab, d_model=args.d_model, encoder_layers=12, decoder_layers=12,
                        encoder_attention_heads=args.heads, decoder_attention_heads=args.heads,
                        encoder_ffn_dim=args.ffn, decoder_ffn_dim=args.ffn, max_position_embeddings=1024,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                        forced_bos_token_id=None, forced_eos_token_id=None)
    teacher = tmp / "teacher-12-12"
    BartForConditionalGeneration(config).save_pretrained(teacher)
    fast.save_pretrained(teacher)
    student = tmp / "student-12-6"
    make_student(str(teacher), str(student), decoder_layers=6)
    return teacher, student


def documents(n: int, length: int, vocab: int) -> list[str]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    return [" ".join(f"w{int(i)}" for i in torch.randint(4, vocab, (int(k),), generator=g)) for k in lengths]


@torch.no_grad()
def time_project(model, tok, docs, settings, generation) -> tuple[float, int]:
    lengths = [len(x) for x in tok(docs)["input_ids"]]
    start = time.perf_counter()
    tokens = 0
    for batch in length_sorted_batches(lengths, settings.batch_size):
        _, counts = generate_batch(model, tok, [docs[i] for i in batch], settings, generation, torch.device("cpu"))
        tokens += sum(counts)
    return time.perf_counter() - start, tokens


@torch.no_grad()
def time_plain(model, tok, docs, new_tokens: int) -> float:
    start = time.perf_counter()
    for doc in docs:  # the common script: one example at a time, the model's defaults
        model.generate(**tok(doc, return_tensors="pt"), max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=50265)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--source-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    docs = documents(args.examples, args.source_len, args.vocab)
    rows, times = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = dict(zip(("teacher 12-12", "student 12-6"), build(Path(tmp), args)))
        for name, path in paths.items():
            model = AutoModelForSeq2SeqLM.from_pretrained(path, attn_implementation="sdpa").eval()
            tok = AutoTokenizer.from_pretrained(path)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            overrides = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "num_beams": 1}
            generation = generation_config_for(model, overrides)
            for regime, batch in (("latency (batch 1)", 1), (f"throughput (batch {args.batch_size})", args.batch_size)):
                settings = GenerateSettings(batch_size=batch, max_source_length=1024, progress=False)
                time_project(model, tok, docs[:2], settings, generation)  # warm-up
                seconds, tokens = time_project(model, tok, docs, settings, generation)
                times[(name, regime)] = seconds
                rows.append((name, regime, "distill generate", params, seconds, tokens))
            seconds = time_plain(model, tok, docs, args.new_tokens)
            times[(name, "plain")] = seconds
            rows.append((name, "latency (batch 1)", "plain model.generate", params, seconds, args.examples * args.new_tokens))
    lines = ["| model | regime | path | params (M) | ms / example | tokens / s | student speed-up |",
             "|---|---|---|---|---|---|---|"]
    for name, regime, path, params, seconds, tokens in rows:
        key = "plain" if path.startswith("plain") else regime
        speedup = times[("teacher 12-12", key)] / times[("student 12-6", key)] if name.startswith("student") else None
        lines.append(f"| {name} | {regime} | {path} | {params:.0f} | {1000 * seconds / args.examples:.1f} | "
                     f"{tokens / seconds:.1f} | {'' if speedup is None else f'{speedup:.2f}x'} |")
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    command = ("python benchmarks/generation.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                             if k != "no_write"))
    append_section("Generation: 12-6 student vs 12-12 teacher",
                   f"Machine: {machine()} (cpu, float32, SDPA, KV cache). Command: `{command}`.\n"
                   f"BART-shaped random-init models, d_model {args.d_model}; {args.examples} inputs of "
                   f"{args.source_len // 2}-{args.source_len} tokens, every output forced to {args.new_tokens} new "
                   "tokens (greedy). Speed-up = teacher time / student time on the same inputs and path.\n\n" + table)


if __name__ == "__main__":
    main()
