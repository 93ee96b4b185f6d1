"""Pre-training objectives on raw text: the maskers' rates, determinism in (seed, epoch, block), independence
from the micro-batch, exact resume through the stream, whole words for three tokenizer kinds, blocks, and
the refusals."""

import numpy as np
import pytest
import torch

from distill.config.parsing import load_config
from distill.config.settings import DataConfig
from distill.data.collate import EPOCH_KEY, IGNORE_INDEX
from distill.data.objectives import (BLOCK_KEY, IDS, OBJECTIVE_KIND, STARTS, Specials, TextObjectiveCollator,
                                     block_rng, check_objective, infill, mlm_mask, noise_spans, span_corrupt,
                                     text_blocks)
from distill.data.stream import BatchStream
from distill.errors import DistillError

MASK = 4
RANDOM = np.arange(10, 100)


def test_mlm_rates_and_80_10_10():
    ids = list(range(10, 110)) * 40  # 4000 tokens, none special
    chosen = replaced = kept = masked = 0
    for block in range(20):
        inputs, labels = mlm_mask(ids, block_rng(0, 0, block), 0.15, MASK, RANDOM)
        picked = [i for i, l in enumerate(labels) if l != IGNORE_INDEX]
        assert len(picked) == 600 and all(labels[i] == ids[i] for i in picked)
        assert all(inputs[i] == ids[i] for i in range(len(ids)) if labels[i] == IGNORE_INDEX)
        chosen += len(picked)
        masked += sum(inputs[i] == MASK for i in picked)
        kept += sum(inputs[i] == ids[i] for i in picked)
        replaced += sum(inputs[i] not in (MASK, ids[i]) for i in picked)
    assert abs(masked / chosen - 0.8) < 0.01 and abs(replaced / chosen - 0.1) < 0.01
    assert abs((kept + replaced) / chosen - 0.2) < 0.01  # a random draw may hit the original token


def test_mlm_never_predicts_a_protected_token():
    ids = [10, 11, 2, 12, 13, 2, 14]
    for block in range(50):
        _, labels = mlm_mask(ids, block_rng(1, 0, block), 0.5, MASK, RANDOM, protected=frozenset({2}))
        assert labels[2] == labels[5] == IGNORE_INDEX and sum(l != IGNORE_INDEX for l in labels) == 2


def test_whole_word_masking_takes_every_token_of_a_word():
    ids = list(range(10, 40))
    starts = [i % 3 == 0 for i in range(30)]  # words of three tokens
    for block in range(20):
        _, labels = mlm_mask(ids, block_rng(0, 0, block), 0.15, MASK, RANDOM, word_starts=starts)
        picked = {i for i, l in enumerate(labels) if l != IGNORE_INDEX}
        assert picked and all({w, w + 1, w + 2} <= picked or not ({w, w + 1, w + 2} & picked) for w in range(0, 30, 3))


def test_span_corruption_rates_and_layout():
    n, noise, spans = 20000, 0, 0
    sentinels = list(range(1000, 900, -1))
    for block in range(200):
        ids = list(range(10, 10 + 100))
        layout = noise_spans(len(ids), block_rng(0, 0, block), 0.15, 3.0)
        inputs, target = span_corrupt(ids, block_rng(0, 0, block), 0.15, 3.0, sentinels)
        noise += sum(e - s for s, e in layout)
        spans += len(layout)
        assert layout[0][0] > 0 and all(a[1] < b[0] for a, b in zip(layout, layout[1:]))  # apart, after kept text
        # the target's spans put back into the input's sentinels give the block again
        restored, pieces = [], {}
        current = None
        for t in target:
            if t in sentinels:
                current = t
                pieces[t] = []
            else:
                pieces[current].append(t)
        for t in inputs:
            restored += pieces[t] if t in sentinels else [t]
        assert restored == ids and [t for t in inputs if t in sentinels] == sentinels[:len(layout)]
    assert abs(noise / n - 0.15) < 0.01 and abs(noise / spans - 3.0) < 0.35


def test_infilling_rates_and_poisson_spans():
    covered = total = 0
    for block in range(300):
        ids = list(range(10, 110))
        out = infill(ids, block_rng(0, 0, block), 0.3, 3.0, MASK)
        kept = [t for t in out if t != MASK]
        assert kept == sorted(kept) and set(kept) <= set(ids)  # the rest, in order
        covered += len(ids) - len(kept)
        total += len(ids)
        assert MASK in out and len(out) <= len(ids)
    assert abs(covered / total - 0.3) < 0.005
    for block in range(500):  # short blocks, where 0-length spans could outnumber the budget
        assert len(infill(list(range(10, 17)), block_rng(2, 0, block), 0.3, 3.0, MASK)) <= 7
    lengths = [int(block_rng(0, 0, b).poisson(3.0)) for b in range(2000)]
    assert abs(np.mean(lengths) - 3.0) < 0.15


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import datasets

    texts = [f"Paragraph {i} was written by a person about topic number {i % 7}, and it goes on for a while."
             for i in range(60)]
    return datasets.Dataset.from_dict({"text": texts})


def _cfg(objective, **kw):
    return DataConfig(path="x", source_column="text", target_column=None, objective=objective, block_length=24, **kw)


@pytest.mark.parametrize("objective", ["mlm", "infilling", "causal"])
def test_blocks_and_batches(corpus, tokenizer, objective):
    cfg = _cfg(objective)
    blocks = text_blocks(corpus, tokenizer, cfg, causal=objective == "causal")
    specials = Specials.of(tokenizer)
    assert blocks[BLOCK_KEY] == list(range(len(blocks)))
    room = 24 - len(specials.prefix) - (0 if objective == "causal" else len(specials.suffix))
    assert all(len(b) == room for b in blocks[IDS][:-1]) and 0 < len(blocks[IDS][-1]) <= room
    whole = sum(blocks[IDS], [])
    assert whole.count(specials.separator[0]) == len(corpus) - 1  # documents joined by the separator
    collate = TextObjectiveCollator(tokenizer, cfg, seed=3, decoder_start_token_id=2)
    rows = [blocks[i] for i in (0, 5, len(blocks) - 1)]
    batch = collate(rows)
    assert batch["input_ids"].shape[1] <= 24
    n_targets = batch["target_index"].numel()
    assert n_targets == int((batch["labels"] != IGNORE_INDEX).sum()) > 0
    if objective == "mlm":
        assert batch["input_ids"].shape == batch["labels"].shape and "decoder_input_ids" not in batch
        picked = batch["labels"] != IGNORE_INDEX
        assert (batch["input_ids"][picked] == tokenizer.mask_token_id).float().mean() > 0.5
    if objective == "infilling":
        assert batch["labels"][0, :24].tolist()[1:-1] == rows[0][IDS]  # the target is the original block
    if objective == "causal":
        assert torch.equal(batch["labels"][0, :-1], batch["input_ids"][0, 1:])


def test_corruption_is_a_function_of_seed_epoch_and_block_alone(corpus, tokenizer):
    cfg = _cfg("mlm")
    blocks = text_blocks(corpus, tokenizer, cfg)
    collate = TextObjectiveCollator(tokenizer, cfg, seed=3)
    alone = collate([blocks[4]])
    with_others = collate([blocks[9], blocks[4], blocks[1]])
    width = alone["input_ids"].shape[1]
    assert torch.equal(alone["input_ids"][0], with_others["input_ids"][1, :width])
    assert torch.equal(alone["labels"][0], with_others["labels"][1, :width])
    later = collate([{**blocks[4], EPOCH_KEY: 1}])
    other_seed = TextObjectiveCollator(tokenizer, cfg, seed=4)([blocks[4]])
    assert not torch.equal(alone["labels"], later["labels"]) and not torch.equal(alone["labels"], other_seed["labels"])


def test_a_resumed_stream_corrupts_the_same_way(corpus, tokenizer):
    cfg = _cfg("mlm")
    blocks = text_blocks(corpus, tokenizer, cfg)
    collate = TextObjectiveCollator(tokenizer, cfg, seed=3)
    stream = BatchStream(blocks, collate, 2, 0, 1, seed=5)
    n = stream.batches_per_epoch
    reference = [next(stream) for _ in range(n + 3)]  # into the second epoch
    resumed = BatchStream(blocks, collate, 2, 0, 1, seed=5)
    for _ in range(n - 1):
        next(resumed)
    state = resumed.state_dict()
    again = BatchStream(blocks, collate, 2, 0, 1, seed=5)
    again.load_state_dict(state)
    for expected in reference[n - 1:]:
        got = next(again)
        assert torch.equal(got["input_ids"], expected["input_ids"]) and torch.equal(got["labels"], expected["labels"])


def test_loader_workers_make_the_same_batches_and_resume_exactly(corpus, tokenizer):
    """data.num_workers: two loader processes per rank make (tokenize, corrupt) the batches the training
    process would, on each of 2 ranks and across an epoch boundary; a stream resumed mid-epoch from one
    whose workers had prefetched past its position continues exactly."""
    cfg = _cfg("mlm")
    blocks = text_blocks(corpus, tokenizer, cfg)
    collate = TextObjectiveCollator(tokenizer, cfg, seed=3)
    take = lambda stream, n: [next(stream) for _ in range(n)]  # noqa: E731
    for rank in range(2):
        plain = BatchStream(blocks, collate, 2, rank, 2, seed=5)
        n = plain.batches_per_epoch + 2
        reference = take(plain, n)
        first = BatchStream(blocks, collate, 2, rank, 2, seed=5, num_workers=2)
        head = take(first, 2)
        resumed = BatchStream(blocks, collate, 2, rank, 2, seed=5, num_workers=2)
        resumed.load_state_dict(first.state_dict())
        got = head + take(resumed, n - 2)
        assert resumed.epoch == 1 and [b.keys() for b in got] == [b.keys() for b in reference]
        assert all(torch.equal(b[k], e[k]) for b, e in zip(got, reference) for k in e), rank


def _wordpiece(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(["unbelievable understanding of tokenization and masking"] * 20 + ["abcdefghijklmnopqrstuvwxyz zabcdefghijklmnopqrstuvwxy"],
                            trainers.WordPieceTrainer(vocab_size=80, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                  ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "unigram"])
def test_whole_words_follow_the_tokenizers_words(kind, tmp_path):
    import datasets

    from distill.models.from_scratch import train_tokenizer

    text = "unbelievably misunderstood tokenizers of maskings"  # unseen words: split into pieces
    trained = "unbelievable understanding of tokenization and masking"
    tok = _wordpiece(tmp_path) if kind == "wordpiece" else train_tokenizer([trained] * 20, tmp_path / kind, 300, kind)
    cfg = _cfg("mlm", whole_word_masking=True)
    cfg.block_length = 200
    blocks = text_blocks(datasets.Dataset.from_dict({"text": [text]}), tok, cfg)
    ids, starts = blocks[0][IDS], blocks[0][STARTS]
    assert len(ids) > 6  # words split into pieces
    words = []
    for t, s in zip(ids, starts):
        if s:
            words.append([t])
        else:
            words[-1].append(t)
    assert [tok.decode(w).replace(" ##", "").strip() for w in words] == text.split()
    assert Specials.of(tok).prefix == (tuple(tok("x")["input_ids"][:1]))


@pytest.mark.parametrize("overrides, message", [
    (["data.objective=mlm"], "data.objective=mlm reads raw text from data.source_column: set data.target_column=null"),
    (["data.objective=mlm", "data.target_column=null", "data.packing=true"], "data.packing"),
    (["data.objective=causal", "data.target_column=null", "data.mask_rate=0.2"], "data.mask_rate must be in (0, 1)"),
    (["data.objective=mlm", "data.target_column=null", "data.mask_rate=1.5"], "data.mask_rate must be in (0, 1)"),
    (["data.objective=infilling", "data.target_column=null", "data.whole_word_masking=true"],
     "data.whole_word_masking applies to data.objective=mlm"),
    (["data.mask_rate=0.2"], "data.mask_rate applies to a pre-training objective: set data.objective"),
    (["data.objective=mlm", "data.target_column=null", "data.block_length=0"], "data.block_length must be >= 1"),
    (["data.objective=bert"], "data.objective"),
])
def test_bad_objective_settings_are_one_line(overrides, message):
    base = ["student.path=x", "student.ds_config=x", "data.path=x", "training.output_dir=x"]
    with pytest.raises(DistillError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, base + overrides)


@pytest.mark.parametrize("objective", sorted(OBJECTIVE_KIND))
def test_each_objective_trains_one_model_kind(objective):
    check_objective(None, "encoder-only", "student")  # supervised data: any kind
    for kind in ("encoder-only", "encoder-decoder", "decoder-only"):
        if kind == OBJECTIVE_KIND[objective]:
            check_objective(objective, kind, "student")
        else:
            with pytest.raises(DistillError, match=f"data.objective={objective} trains .* and the student is {kind}$"):
                check_objective(objective, kind, "student")


def test_collator_refusals(tokenizer):
    with pytest.raises(DistillError, match="sentinel tokens <extra_id_0>"):
        TextObjectiveCollator(tokenizer, _cfg("span_corruption"), 0, 2)
    with pytest.raises(DistillError, match="no decoder_start_token_id"):
        TextObjectiveCollator(tokenizer, _cfg("infilling"), 0, None)
    with pytest.raises(DistillError, match="leaves"):
        text_blocks(__import__("datasets").Dataset.from_dict({"text": ["a b"]}), tokenizer,
                    DataConfig(path="x", source_column="text", target_column=None, objective="mlm", block_length=3))


def test_span_corruption_batches_with_sentinels(corpus, tmp_path):
    from distill.models.from_scratch import train_tokenizer

    tok = train_tokenizer(corpus["text"], tmp_path / "tok", 400, sentinels=20)
    cfg = _cfg("span_corruption")
    blocks = text_blocks(corpus, tok, cfg)
    batch = TextObjectiveCollator(tok, cfg, 0, tok.pad_token_id)([blocks[0], blocks[1]])
    first = tok.convert_tokens_to_ids("<extra_id_0>")
    assert batch["input_ids"][0].tolist().count(first) == 1 and batch["labels"][0, 0].item() == first
    assert batch["decoder_input_ids"][0, 0].item() == tok.pad_token_id
    assert batch["labels"][0].tolist()[(batch["labels"][0] != IGNORE_INDEX).sum() - 1] == tok.eos_token_id
