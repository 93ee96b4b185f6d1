"""Starting from a corpus and no pretrained model: ``distill train-tokenizer`` and ``distill init-bart``."""

import pytest
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from distill.cli import main


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
    code, out, _ = _run(capsys, "init-bart", "--tokenizer", tmp_path / "tok", "--out", tmp_path / "model",
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
            (["init-bart", "--tokenizer", tmp_path / "none", "--out", tmp_path / "m"], "cannot load tokenizer"),
            (["init-bart", "--tokenizer", demo_assets["tokenizer"], "--out", tmp_path / "m", "--d-model", 30,
              "--heads", 4], "not divisible"),
            (["init-bart", "--tokenizer", demo_assets["tokenizer"], "--out", tmp_path / "m", "--layers", 0],
             "layers must be >= 1")):
        code, _, err = _run(capsys, *args)
        assert code == 2 and len(err) == 1 and message in err[0], (args, err)
    assert not (tmp_path / "t").exists() and not (tmp_path / "m").exists()
