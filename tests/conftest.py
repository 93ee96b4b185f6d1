"""Shared tiny assets: a tokenizer trained on the demo corpus, tiny BART teacher and student. And the
guard of the fast tier: a test not marked integration that starts ranks fails."""

import contextlib
import functools
import inspect
import os
import subprocess

import pytest
import torch.distributed

import ranks
from examples.demo.corpus import write_demo_data
from distill.models.from_scratch import init_model

# The test in setup or call when it is not marked integration, else None. Checked where ranks start (a
# process, or an in-process group of more than one rank), so that the rule holds for tests written later.
_unmarked: str | None = None


def _refuse(what: str) -> None:
    pytest.fail(f"{_unmarked} starts ranks ({what}) but is not marked integration: mark it "
                "@pytest.mark.integration (`pytest -m \"not integration\"` is the fast tier)", pytrace=False)


_popen_init = subprocess.Popen.__init__
_init_process_group = torch.distributed.init_process_group


@functools.wraps(_popen_init)
def _guarded_popen_init(self, args, *rest, **kwargs):
    if _unmarked and ranks.launches_ranks(args):
        _refuse(str(args if isinstance(args, (str, bytes)) else [os.fsdecode(a) for a in args])[:300])
    _popen_init(self, args, *rest, **kwargs)


@functools.wraps(_init_process_group)
def _guarded_init_process_group(*args, **kwargs):
    world = inspect.signature(_init_process_group).bind_partial(*args, **kwargs).arguments.get("world_size", -1)
    if world in (None, -1):
        world = int(os.environ.get("WORLD_SIZE", "1"))
    if _unmarked and world > 1:
        _refuse(f"a process group of {world} ranks")
    return _init_process_group(*args, **kwargs)


subprocess.Popen.__init__ = _guarded_popen_init
torch.distributed.init_process_group = _guarded_init_process_group


@contextlib.contextmanager
def _guarding(item):
    global _unmarked
    _unmarked = None if item.get_closest_marker("integration") else item.nodeid
    try:
        yield
    finally:
        _unmarked = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _guarding(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _guarding(item):
        return (yield)


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    paths = write_demo_data(root / "data", seed=1, n_train=96, n_validation=24, n_test=8)
    # d_model 128: big enough that the shipped teacher config's persistence threshold (1e4 elements)
    # leaves the weight matrices partitioned, as in a real model.
    teacher = init_model(root / "teacher", paths["tokenizer"], layers=2, d_model=128, ffn=128, heads=4)
    return {"root": root, "data": root / "data", "tokenizer": paths["tokenizer"], "teacher": teacher}


@pytest.fixture(scope="session")
def tokenizer(demo_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_assets["tokenizer"])


@pytest.fixture(scope="session")
def trained_teacher(demo_assets):
    """The tiny teacher after a short plain-torch training on the demo data, so that what it generates
    depends on its input (a random-init model says the same thing for every document)."""
    import datasets
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out = demo_assets["root"] / "trained-teacher"
    if out.exists():
        return out
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(demo_assets["teacher"])
    model = AutoModelForSeq2SeqLM.from_pretrained(demo_assets["teacher"]).train()
    train = datasets.load_dataset(str(demo_assets["data"]), split="train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(120):
        rows = train.select([(step * 16 + i) % len(train) for i in range(16)])
        enc = tok(list(rows["document"]), text_target=list(rows["summary"]), return_tensors="pt", padding=True, truncation=True,
                  max_length=128)
        enc["labels"][enc["labels"] == tok.pad_token_id] = -100
        model(**enc).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def pair(demo_assets):
    """Overrides naming the tiny teacher, a 2-1 student made from it, and the demo data."""
    from distill.models.make_student import make_student

    student = demo_assets["root"] / "student"
    if not student.exists():
        make_student(str(demo_assets["teacher"]), str(student), decoder_layers=1)
    return [f"teacher.path={demo_assets['teacher']}", f"student.path={student}", f"data.path={demo_assets['data']}"]
