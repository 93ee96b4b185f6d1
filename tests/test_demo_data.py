"""Tests for the demo corpus (examples/demo/corpus.py): synthetic corpus, tokenizer, random-init teacher, demo data dir."""

import json
import re

import pytest

from examples.demo import corpus as demo_data
from distill.models.from_scratch import init_model, train_tokenizer
from examples.demo.corpus import generate_corpus, write_demo_data
from distill.errors import DistillError

SIZES = {"train": 300, "validation": 40, "test": 40}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    paths = write_demo_data(
        out, seed=7, n_train=SIZES["train"], n_validation=SIZES["validation"], n_test=SIZES["test"]
    )
    return out, paths


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_dir[1]["tokenizer"])


@pytest.fixture(scope="module")
def teacher_dir(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "init"
    init_model(out, demo_dir[1]["tokenizer"], layers=2, seed=3)
    return out


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------ corpus


def test_corpus_is_deterministic_per_seed():
    a = generate_corpus(40, seed=11)
    assert a == generate_corpus(40, seed=11)
    b = generate_corpus(40, seed=12)
    assert [r["document"] for r in a] != [r["document"] for r in b]
    # the meta flag only adds a key, it does not change the random stream
    with_meta = generate_corpus(40, seed=11, with_meta=True)
    assert [{k: r[k] for k in ("id", "document", "summary")} for r in with_meta] == a


def test_corpus_schema_and_ids():
    recs = generate_corpus(30, seed=1)
    assert len(recs) == 30
    for r in recs:
        assert set(r) == {"id", "document", "summary"}
        assert all(isinstance(r[k], str) and r[k] for k in r)
    assert len({r["id"] for r in recs}) == 30
    assert generate_corpus(0, seed=1) == []
    with pytest.raises(DistillError):
        generate_corpus(-1, seed=1)


def test_lengths_in_range():
    for r in generate_corpus(400, seed=2):
        assert 60 <= len(r["document"].split()) <= 110
        assert 12 <= len(r["summary"].split()) <= 30
        n_doc_sents = len(re.findall(r"\.(?: |$)", r["document"]))
        assert 6 <= n_doc_sents <= 9
        n_sum_sents = len(re.findall(r"\.(?: |$)", r["summary"]))
        assert 2 <= n_sum_sents <= 3


def test_summary_facts_come_from_document_and_ignore_distractors():
    for r in generate_corpus(300, seed=3, with_meta=True):
        doc, summ, meta = r["document"], r["summary"], r["meta"]
        entity = meta["entity"]
        # the main entity is introduced by the first sentence
        assert doc.split(". ")[0].count(entity) == 1
        # every summary sentence is about the main entity, in canonical form
        sentences = [s for s in summ.split(". ") if s]
        assert len(sentences) == len(meta["facts"])
        assert all(s.startswith(entity + " ") for s in sentences)
        # all fact values are copied from the document
        for values in meta["facts"].values():
            for v in values.values():
                assert str(v) in doc and str(v) in summ
        # every number in the summary appears in the document
        assert set(re.findall(r"\d+", summ)) <= set(re.findall(r"\d+", doc))
        # distractors share the fact kinds but never leak into the summary
        assert meta["distractors"]
        for person in meta["distractors"]:
            assert person in doc
            for part in person.split():
                assert part not in summ
                assert part not in entity.split()


def test_document_uses_paraphrases_summary_is_canonical():
    recs = generate_corpus(300, seed=4, with_meta=True)
    canonical = re.compile(
        r"^(\w+ \w+ (works as a \w+ at \w+|lives in \w+|owns \d+ \w+|was born in \d{4})\.)$"
    )
    paraphrased = 0
    for r in recs:
        for s in re.split(r"(?<=\.) ", r["summary"]):
            assert canonical.match(s), s
        job = r["meta"]["facts"].get("job")
        if job and f"works as a {job['role']} at {job['org']}" not in r["document"]:
            paraphrased += 1
    assert paraphrased > 50  # the model has to normalise phrasing, not just copy sentences


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_special_ids_and_config(tokenizer):
    assert tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.unk_token_id == 3
    assert tokenizer.mask_token == "<mask>" and tokenizer.mask_token_id is not None
    assert tokenizer.model_max_length == 512
    assert tokenizer.padding_side == "right"
    assert 1024 <= len(tokenizer) <= 2048
    ids = tokenizer("Anna Berg lives in Oslo.")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and 0 not in ids[1:-1] and 2 not in ids[1:-1]
    batch = tokenizer(["a", "Anna Berg lives in Oslo."], padding=True)["input_ids"]
    assert batch[0][-1] == 1 and batch[0][:3] != [1, 1, 1]  # padded on the right


def test_tokenizer_round_trip(demo_dir, tokenizer):
    recs = _read_jsonl(demo_dir[1]["test"])
    texts = [t for r in recs for t in (r["document"], r["summary"])]
    texts += ["", " leading space", "two  spaces\nand a newline ", "Ünïcødé ✓ 12345"]
    for t in texts:
        ids = tokenizer(t)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == t
    enc = tokenizer(texts[:8], padding=True)["input_ids"]
    assert tokenizer.batch_decode(enc, skip_special_tokens=True) == texts[:8]


def test_entity_words_are_single_tokens(tokenizer):
    for words in (demo_data.FIRST_NAMES, demo_data.LAST_NAMES, demo_data.CITIES,
                  demo_data.ORGANISATIONS, demo_data.ROLES, demo_data.OBJECTS):
        for w in words:
            # same token at the start of a text as inside it
            assert tokenizer.tokenize(w) == tokenizer.tokenize(" " + w)[-1:]
            assert len(tokenizer.tokenize(w)) == 1, w


def test_train_tokenizer_directly(tmp_path):
    from transformers import AutoTokenizer

    texts = [r["document"] for r in generate_corpus(100, seed=5)]
    tok = train_tokenizer(texts, tmp_path / "tok", vocab_size=400)
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok) == len(again) <= 400
    assert again(texts[0])["input_ids"] == tok(texts[0])["input_ids"]
    assert again.decode(again(texts[0])["input_ids"], skip_special_tokens=True) == texts[0]
    with pytest.raises(DistillError):
        train_tokenizer(texts, tmp_path / "bad", vocab_size=100)


# ------------------------------------------------------------------ teacher init


def test_teacher_init_reloads_and_trains(teacher_dir, tokenizer):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

    model = AutoModelForSeq2SeqLM.from_pretrained(teacher_dir)
    cfg = model.config
    assert cfg.model_type == "bart"
    assert cfg.vocab_size % 8 == 0 and len(tokenizer) <= cfg.vocab_size < len(tokenizer) + 8
    assert (cfg.encoder_layers, cfg.decoder_layers, cfg.d_model) == (2, 2, 128)
    assert (cfg.encoder_ffn_dim, cfg.encoder_attention_heads) == (256, 4)
    assert cfg.max_position_embeddings == 512 and cfg.dropout == 0.1
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (1, 0, 2)
    assert cfg.decoder_start_token_id == 2
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    gen = GenerationConfig.from_pretrained(teacher_dir)
    assert gen.num_beams == 1 and gen.max_length == 64 and gen.forced_bos_token_id is None

    tok = AutoTokenizer.from_pretrained(teacher_dir)  # saved alongside the weights
    assert tok.get_vocab() == tokenizer.get_vocab()

    docs = ["Anna Berg lives in Oslo. It rained.", "Boris Costa owns 12 cats."]
    summs = ["Anna Berg lives in Oslo.", "Boris Costa owns 12 cats."]
    batch = tok(docs, padding=True, return_tensors="pt")
    labels = tok(text_target=summs, padding=True, return_tensors="pt")["input_ids"]
    labels[labels == tok.pad_token_id] = -100
    model.train()
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss)
    assert out.logits.shape == (2, labels.shape[1], cfg.vocab_size)
    out.loss.backward()

    model.eval()
    with torch.no_grad():
        gen_ids = model.generate(**batch, max_new_tokens=5)
    assert int(gen_ids.max()) < len(tokenizer)  # padding rows are never generated


def test_teacher_init_is_deterministic(teacher_dir, demo_dir, tmp_path):
    from safetensors.torch import load_file

    init_model(tmp_path / "again", demo_dir[1]["tokenizer"], layers=2, seed=3)
    init_model(tmp_path / "other", demo_dir[1]["tokenizer"], layers=2, seed=4)
    a = load_file(str(teacher_dir / "model.safetensors"))
    b = load_file(str(tmp_path / "again" / "model.safetensors"))
    c = load_file(str(tmp_path / "other" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)
    assert any(not (a[k] == c[k]).all() for k in a)
    with pytest.raises(DistillError):
        init_model(tmp_path / "bad", demo_dir[1]["tokenizer"], d_model=130, heads=4)


# ------------------------------------------------------------------ demo data dir


def test_demo_files_and_splits(demo_dir):
    out, paths = demo_dir
    assert {"train", "validation", "test", "tokenizer", "dir"} <= set(paths)
    splits = {s: _read_jsonl(paths[s]) for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in splits.items()} == SIZES
    for recs in splits.values():
        assert all(set(r) == {"id", "document", "summary"} for r in recs)
    ids = [r["id"] for v in splits.values() for r in v]
    docs = [r["document"] for v in splits.values() for r in v]
    assert len(set(ids)) == len(ids) and len(set(docs)) == len(docs)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sizes"] == SIZES and meta["seed"] == 7
    assert meta["token_lengths"]["train"]["document"]["max"] <= 512
    # nothing half-written is left next to the finished directory
    assert sorted(p.name for p in out.parent.iterdir()) == ["data"]


def test_demo_files_load_with_datasets(demo_dir):
    import datasets

    out, paths = demo_dir
    explicit = datasets.load_dataset(
        "json", data_files={s: paths[s] for s in ("train", "validation", "test")}
    )
    auto = datasets.load_dataset(str(out))
    for ds in (explicit, auto):
        assert set(ds) == set(SIZES)
        for s, n in SIZES.items():
            assert ds[s].num_rows == n
            assert set(ds[s].column_names) == {"id", "document", "summary"}
    assert auto["train"][0] == _read_jsonl(paths["train"])[0]


def test_write_demo_data_is_deterministic_and_replaces(demo_dir, tmp_path):
    out = tmp_path / "d"
    write_demo_data(out, seed=7, n_train=SIZES["train"], n_validation=SIZES["validation"],
                    n_test=SIZES["test"])
    for s in ("train.jsonl", "validation.jsonl", "test.jsonl", "tokenizer/tokenizer.json"):
        assert (out / s).read_bytes() == (demo_dir[0] / s).read_bytes()
    # rewriting over an existing directory replaces it as a whole
    (out / "stale.txt").write_text("x")
    write_demo_data(out, seed=8, n_train=20, n_validation=5, n_test=5)
    assert not (out / "stale.txt").exists()
    assert len(_read_jsonl(out / "train.jsonl")) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(demo_data, "train_tokenizer", boom)
    with pytest.raises(RuntimeError):
        write_demo_data(tmp_path / "d", n_train=10, n_validation=2, n_test=2)
    assert list(tmp_path.iterdir()) == []
