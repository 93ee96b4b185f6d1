"""Starting from a corpus and no pretrained model: ``distill train-tokenizer`` and ``distill init-model``."""

import pytest
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

from distill.cli import main
from distill.models.architectures import model_kind
from distill.models.from_scratch import FAMILIES
from distill.models.loading import auto_class


def _run(capsys, *args):
    capsys.readouterr()
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_a_tokenizer_and_a_model_from_a_corpus(demo_assets, tmp_path, capsys, kind):
    import datasets

    code, out, _ = _run(capsys, "train-tokenizer", "--data", demo_assets["data"], "--out", tmp_path / "tok",
                        "--vocab-size", 600, "--kind", kind)
    assert code == 0 and f"{kind} tokenizer of" in out and "document, summary" in out
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = datasets.load_dataset(str(demo_assets["data"]), split="validation")[0]["summary"] + " ünseen 🐈"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text  # bytes cover any text
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    code, out, _ = _run(capsys, "init-model", "--tokenizer", tmp_path / "tok", "--out", tmp_path / "model",
                        "--layers", 1, "--d-model", 32, "--ffn", 64, "--heads", 2, "--max-positions", 256)
    assert code == 0, out
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "model")
    assert model.config.vocab_size % 8 == 0 and model.config.vocab_size >= len(tok)
    assert model.config.max_position_embeddings == 256 and model.config.encoder_layers == 1
    assert model.generation_config.suppress_tokens == (list(range(len(tok), model.config.vocab_size)) or None)


def test_bad_input_is_one_line(demo_assets, tmp_path, capsys):
    for args, message in (
            (["train-tokenizer", "--data", demo_assets["data"], "--out", tmp_path / "t", "data.source_column=body"],
             "body"),
            (["train-tokenizer", "--data", tmp_path / "nowhere", "--out", tmp_path / "t"], "nowhere"),
            (["train-tokenizer", "--data", demo_assets["data"], "--out", tmp_path / "t", "--vocab-size", 0],
             "--vocab-size must be >= 1"),
            (["init-model", "--tokenizer", tmp_path / "none", "--out", tmp_path / "m"], "cannot load tokenizer"),
            (["init-model", "--tokenizer", demo_assets["tokenizer"], "--out", tmp_path / "m", "--d-model", 30,
              "--heads", 4], "not divisible"),
            (["init-model", "--tokenizer", demo_assets["tokenizer"], "--out", tmp_path / "m", "--layers", 0],
             "layers must be >= 1")):
        code, _, err = _run(capsys, *args)
        assert code == 2 and len(err) == 1 and message in err[0], (args, err)
    assert not (tmp_path / "t").exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_starts_from_a_tokenizer(demo_assets, tmp_path, capsys, family):
    """A model of each family for a tokenizer with T5's sentinels: it loads as its task class, reads the
    tokenizer's special ids and runs; the same seed gives the same weights."""
    import torch

    code, _, _ = _run(capsys, "train-tokenizer", "--data", demo_assets["data"], "--out", tmp_path / "tok",
                      "--vocab-size", 400, "--sentinels", 8)
    assert code == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tok.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_7>"]) == [len(tok) - 1, len(tok) - 8]
    for name in ("a", "b"):
        code, out, err = _run(capsys, "init-model", "--family", family, "--tokenizer", tmp_path / "tok", "--out",
                              tmp_path / name, "--layers", 2, "--d-model", 32, "--ffn", 64, "--heads", 4,
                              "--max-positions", 64)
        assert code == 0, err
    config = AutoConfig.from_pretrained(tmp_path / "a")
    model = auto_class(config).from_pretrained(tmp_path / "a").eval()
    assert config.model_type == family and config.vocab_size >= len(tok) and config.pad_token_id == tok.pad_token_id
    kind = {"bart": "encoder-decoder", "t5": "encoder-decoder", "llama": "decoder-only"}.get(family, "encoder-only")
    assert model_kind(config) == kind and (tmp_path / "a" / "generation_config.json").exists() == (kind != "encoder-only")
    ids = tok(["a short text <extra_id_0> and more"], return_tensors="pt")
    extra = {"decoder_input_ids": ids["input_ids"][:, :3]} if config.is_encoder_decoder else {}
    with torch.no_grad():
        assert torch.isfinite(model(**ids, **extra).logits).all()
    other = auto_class(config).from_pretrained(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), other.state_dict().values()))
