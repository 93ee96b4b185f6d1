"""Shared tiny assets: a tokenizer trained on the demo corpus, tiny BART teacher and student."""

import pytest

from distill.demo_data import build_teacher_init, write_demo_data


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    paths = write_demo_data(root / "data", seed=1, n_train=96, n_validation=24, n_test=8)
    # d_model 128: big enough that the shipped teacher config's persistence threshold (1e4 elements)
    # leaves the weight matrices partitioned, as in a real model.
    teacher = build_teacher_init(root / "teacher", paths["tokenizer"], layers=2, d_model=128, ffn=128, heads=4)
    return {"root": root, "data": root / "data", "tokenizer": paths["tokenizer"], "teacher": teacher}


@pytest.fixture(scope="session")
def tokenizer(demo_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_assets["tokenizer"])
