"""Bad input is refused before any rank starts or model loads: one line on stderr, exit code 2."""

import json
from pathlib import Path

import pytest

from distill.train.launch import main

ROOT = Path(__file__).parents[1]


@pytest.fixture
def args(demo_assets, tmp_path):
    student = demo_assets["root"] / "student-bad-input"
    if not student.exists():
        from distill.models.make_student import make_student

        make_student(str(demo_assets["teacher"]), str(student), decoder_layers=1)
    return ["--config", str(ROOT / "recipes/demo/kd.yaml"), f"teacher.path={demo_assets['teacher']}",
            f"student.path={student}", f"data.path={demo_assets['data']}", f"training.output_dir={tmp_path / 'out'}"]


def run(capsys, argv):
    capsys.readouterr()  # drop what fixtures printed
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.fixture
def other_vocab_teacher(tmp_path):
    from distill.models.from_scratch import init_model, train_tokenizer

    tok = train_tokenizer(["completely different words about weather and rivers " * 3, "zebra yak quokka"],
                          tmp_path / "tok", vocab_size=300)
    assert tok is not None
    return init_model(tmp_path / "other", tmp_path / "tok", layers=1, d_model=32, ffn=32, heads=2)


@pytest.mark.parametrize("override, message", [
    ("student.path=/nonexistent/model", "student.path /nonexistent/model not found"),
    ("teacher.path=/nonexistent/teacher", "teacher.path /nonexistent/teacher not found"),
    ("data.source_column=article", "data.source_column 'article' is not a column of the train split"),
    ("data.path=/nonexistent/data.jsonl", "data.path not found: /nonexistent/data.jsonl"),
    ("teacher.ds_config=ds_configs/student_zero2.json", "the teacher must use ZeRO stage 3"),
    ("student.ds_config=/nonexistent.json", "student.ds_config not found"),
    ("data.max_source_length=0", "data.max_source_length must be >= 1"),
    ("training.precision=fp16", "training.precision=fp16 needs a GPU"),
    ("data.max_train_samples=1", "the training split has 1 examples, fewer than one global batch"),
])
def test_one_line_errors(capsys, args, override, message, tmp_path):
    code, err = run(capsys, [*args, override])
    assert code == 2
    assert len(err) == 1 and err[0].startswith("distill: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()  # nothing written, no checkpoint marked latest


@pytest.mark.parametrize("objective, message", [
    ("mlm", "data.objective=mlm trains encoder-only models, and the student is encoder-decoder"),
    ("causal", "data.objective=causal trains decoder-only models, and the student is encoder-decoder"),
])
def test_text_objective_of_another_model_kind(capsys, args, objective, message, tmp_path):
    code, err = run(capsys, [*args, f"data.objective={objective}", "data.target_column=null"])
    assert code == 2
    assert len(err) == 1 and err[0].startswith("distill: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_empty_dataset(capsys, args, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.jsonl").write_text(json.dumps({"document": "x", "summary": "y"}) + "\n")
    (empty / "validation.jsonl").write_text(json.dumps({"document": "x", "summary": "y"}) + "\n")
    code, err = run(capsys, [*args, f"data.path={empty}", "data.max_train_samples=0"])
    assert code == 2 and "data.max_train_samples must be >= 1" in err[0]
    header_only = tmp_path / "header.csv"
    header_only.write_text("document,summary\n")
    code, err = run(capsys, [*args, f"data.path={header_only}", "data.eval_split=null"])
    assert code == 2 and len(err) == 1 and "the train split 'train' of dataset" in err[0] and "is empty" in err[0], err


def test_different_vocabularies_are_refused(capsys, args, other_vocab_teacher):
    code, err = run(capsys, [*args, f"teacher.path={other_vocab_teacher}"])
    assert code == 2 and len(err) == 1 and "teacher and student tokenizers differ" in err[0], err
    assert "set loss.cross_tokenizer to uld, hybrid or mined" in err[0]


@pytest.fixture
def narrow_student(demo_assets):
    student = demo_assets["root"] / "student-narrow"
    if not student.exists():
        from distill.models.make_student import make_student

        make_student(str(demo_assets["teacher"]), str(student), encoder_layers=1, decoder_layers=1,
                     hidden_size=64, num_heads=4, ffn_size=64)
    return student


@pytest.mark.parametrize("overrides, message", [
    (["loss.w_attn=1", "loss.attention.teacher_layer=5"],
     "loss.attention.teacher_layer = 5 indexes past the model's 2 layers"),
    (["loss.w_hid=1", "loss.hidden.stacks=decoder", "loss.hidden.map=custom", "loss.hidden.teacher_layers=7"],
     "layer map [7] indexes past the teacher's 2 layers"),
    (["loss.w_rel=1", "loss.relation.heads=3"], "loss.relation.heads = 3 does not divide the student's encoder_self q width 128"),
    (["loss.w_attn=1", "student.attn_implementation=eager"], "attention capture runs on SDPA"),
    (["loss.w_attn=1", "loss.attention.sites=encoder_self,cross"], "config key 'loss.attention.sites[1]' must be one of"),
])
def test_feature_settings_refused_before_loading(capsys, args, overrides, message, tmp_path):
    code, err = run(capsys, [*args, *overrides])
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_width_change_without_projection_is_refused(capsys, args, narrow_student, tmp_path):
    code, err = run(capsys, [*args, f"student.path={narrow_student}", "loss.w_hid=1", "loss.hidden.map=last"])
    assert code == 2 and len(err) == 1, err
    assert "student's hidden size (64) differs from the teacher's (128)" in err[0]
    assert "loss.hidden.projection=true" in err[0]


def test_bad_data_refused_before_loading(capsys, args, tmp_path):
    """A null in the evaluation split, or a malformed line in a file of the dataset directory, is one
    line naming it, before any model loads (not at the batch holding it, after all of training)."""
    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps({"document": f"d {i}", "summary": f"s {i}"}) + "\n" for i in range(32)]
    (data / "train.jsonl").write_text("".join(lines))
    (data / "validation.jsonl").write_text("".join(lines[:5]) + json.dumps({"document": "x", "summary": None}))
    code, err = run(capsys, [*args, f"data.path={data}"])
    assert code == 2 and err == ["distill: error: data: row 5 of the eval split 'validation' has a null in column "
                                 "'summary' (set data.skip_invalid: true to drop such rows)"], err
    (data / "train.jsonl").write_text("".join(lines[:3]) + '{"document": "x", "summary": \n' + "".join(lines[3:]))
    code, err = run(capsys, [*args, f"data.path={data}"])
    assert code == 2 and len(err) == 1 and f"(file {data / 'train.jsonl'}): " in err[0], err
    assert not (tmp_path / "out").exists()
