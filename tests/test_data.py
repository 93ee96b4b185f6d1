"""Data: resumable seeded order, collation, evaluation shards, and clear errors for bad datasets."""

import json
import multiprocessing
import os
import signal
import time

import pytest
import torch

from distill.config.settings import DataConfig
from distill.data.collate import IGNORE_INDEX, Seq2SeqCollator, shift_right
from distill.data.stream import BatchStream, epoch_order, eval_loader, loader_workers, rank_batches
from distill.data.loading import load_split
from distill.errors import DistillError


def test_epoch_order_splits_evenly_and_deterministically():
    order = epoch_order(103, 0, 7)
    assert sorted(order) == list(range(103)) and order == epoch_order(103, 0, 7)
    assert order != epoch_order(103, 1, 7) and order != epoch_order(103, 0, 8)  # reshuffled each epoch and seed
    ranks = [rank_batches(order, 4, 1, r, 2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 103 // 8
    flat = [i for batches in ranks for b in batches for i in b]
    assert len(flat) == len(set(flat)) == 96  # no example twice in an epoch, the remainder dropped


def _steps(order, micro, accumulation, world):
    """Each optimizer step's examples, gathered over the ranks' micro-batches."""
    per_rank = [rank_batches(order, micro, accumulation, r, world) for r in range(world)]
    return [sorted(i for batches in per_rank for b in batches[s * accumulation:(s + 1) * accumulation] for i in b)
            for s in range(len(per_rank[0]) // accumulation)]


def test_every_split_of_a_global_batch_gives_each_step_the_same_examples():
    order = epoch_order(50, 3, 1)
    reference = _steps(order, 12, 1, 1)
    assert len(reference) == 4
    for micro, accumulation, world in [(6, 2, 1), (6, 1, 2), (3, 2, 2), (1, 4, 3), (2, 1, 6), (4, 3, 1)]:
        assert _steps(order, micro, accumulation, world) == reference, (micro, accumulation, world)


def test_batch_stream_resumes_exactly():
    data = [{"i": i} for i in range(37)]
    collate = lambda rows: [r["i"] for r in rows]  # noqa: E731
    full = BatchStream(data, collate, 3, 1, 2, seed=5)
    reference = [next(full) for _ in range(20)]  # crosses epoch boundaries (6 batches per epoch)
    first = BatchStream(data, collate, 3, 1, 2, seed=5)
    head = [next(first) for _ in range(9)]
    resumed = BatchStream(data, collate, 3, 1, 2, seed=5)
    resumed.load_state_dict(first.state_dict())
    assert head + [next(resumed) for _ in range(11)] == reference


def test_batch_stream_resumes_on_another_number_of_ranks():
    """2 ranks x 2 examples for 7 steps, then 1 rank x 2 x 2 accumulation, then 4 ranks x 1: every step
    sees the examples an uninterrupted 2-rank run sees, across epoch boundaries (3 steps per epoch)."""
    data = [{"i": i} for i in range(14)]
    collate = lambda rows: [r["i"] for r in rows]  # noqa: E731

    def run(streams, steps):
        out = []
        for _ in range(steps):
            step = []
            for s in streams:
                for _ in range(s.accumulation):
                    step += next(s)
                    assert s.last_ids == step[-len(s.last_ids):]
            out.append(sorted(step))
        return out

    reference = run([BatchStream(data, collate, 2, r, 2, seed=3) for r in range(2)], 12)
    two = [BatchStream(data, collate, 2, r, 2, seed=3) for r in range(2)]
    got = run(two, 7)
    one = BatchStream(data, collate, 2, 0, 1, seed=3, accumulation=2)
    one.load_state_dict(two[0].state_dict())
    got += run([one], 2)
    four = [BatchStream(data, collate, 1, r, 4, seed=3) for r in range(4)]
    for s in four:
        s.load_state_dict(one.state_dict())
    assert got + run(four, 3) == reference
    assert one.state_dict() == {"epoch": 2, "samples": 12, "global_batch": 4}  # the end of the third epoch
    with pytest.raises(DistillError, match="does not fit this run's global batch of 6"):
        BatchStream(data, collate, 3, 0, 2, seed=3).load_state_dict(one.state_dict())


def test_loader_workers_leave_stop_signals_to_the_training_process():
    """Ctrl-C, a hangup and Slurm's warning reach every process of a run: its loader workers ignore them
    (the training process stops the run and shuts them down), and the batches go on."""
    data = [{"i": i} for i in range(40)]
    collate = lambda rows: [r["i"] for r in rows]  # noqa: E731
    plain = BatchStream(data, collate, 2, 0, 1, seed=5)
    reference = [next(plain) for _ in range(10)]
    before = set(multiprocessing.active_children())
    stream = BatchStream(data, collate, 2, 0, 1, seed=5, num_workers=2)
    got = [next(stream) for _ in range(2)]  # one from each worker: both have set their signals up
    workers = [w for w in multiprocessing.active_children() if w not in before]
    assert len(workers) == 2
    for worker in workers:
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            os.kill(worker.pid, sig)
    time.sleep(1)
    assert all(w.is_alive() for w in workers)
    assert got + [next(stream) for _ in range(8)] == reference


def test_batch_stream_needs_one_global_batch():
    with pytest.raises(DistillError, match="fewer than one global batch"):
        BatchStream([{}] * 5, list, 4, 0, 2, seed=0)


def test_shift_right():
    labels = torch.tensor([[5, 6, 7, IGNORE_INDEX]])
    assert shift_right(labels, 2, 1).tolist() == [[2, 5, 6, 7]]
    assert shift_right(torch.tensor([[5, IGNORE_INDEX, IGNORE_INDEX]]), 2, 1).tolist() == [[2, 5, 1]]


def test_collator_pads_dynamically(tokenizer):
    cfg = DataConfig(path="x", source_prefix="", max_source_length=12, max_target_length=8)
    rows = [{"document": "Anna Berg lives in Oslo. " * 5, "summary": "Anna Berg lives in Oslo."},
            {"document": "Short.", "summary": "Oslo"}]
    b = Seq2SeqCollator(tokenizer, cfg, decoder_start_token_id=2)(rows)
    assert b["input_ids"].shape == (2, 12)  # truncated to the limit, padded to the longest
    assert b["attention_mask"][1].sum() < 12
    assert (b["labels"][1] == IGNORE_INDEX).any() and b["labels"].shape[1] == 8
    assert (b["decoder_input_ids"][:, 0] == 2).all()
    assert b["weight"].tolist() == [1.0, 1.0]


def test_eval_shards_cover_every_row_once(tokenizer):
    data = [{"document": f"Doc {i}.", "summary": f"S {i}."} for i in range(7)]
    cfg = DataConfig(path="x")
    collate = Seq2SeqCollator(tokenizer, cfg, 2)
    seen = []
    for rank in range(3):
        loader = eval_loader(data, collate, 2, rank, 3)
        assert len(loader) == 2  # ceil(7 / 3) = 3 rows per rank, in 2 batches, on every rank
        for batch in loader:
            seen += [w for w in batch["weight"].tolist()]
    assert sum(seen) == 7 and len(seen) == 9


@pytest.fixture
def jsonl(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps({"document": f"d{i}", "summary": f"s{i}"}) + "\n" for i in range(5)))
    return p


def test_load_split_from_file_and_errors(jsonl, tmp_path):
    cfg = DataConfig(path=str(jsonl), max_train_samples=3)
    assert len(load_split(cfg, "train", "train")) == 3
    assert len(load_split(DataConfig(path=str(jsonl)), "train[-2:]", "eval")) == 2
    with pytest.raises(DistillError, match="data.target_column 'highlights' is not a column"):
        load_split(DataConfig(path=str(jsonl), target_column="highlights"), "train", "train")
    with pytest.raises(DistillError, match="data.path not found"):
        load_split(DataConfig(path=str(tmp_path / "missing.jsonl")), "train", "train")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DistillError, match="cannot load train split|is empty"):
        load_split(DataConfig(path=str(empty)), "train", "train")
    with pytest.raises(DistillError, match="cannot load eval split 'validation'"):
        load_split(DataConfig(path=str(tmp_path)), "validation", "eval")


def test_a_text_file_is_one_row_per_line_in_a_text_column(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("First paragraph, written by a person.\n\nSecond one.\n")
    rows = load_split(DataConfig(path=str(corpus), source_column="text", target_column=None), "train", "train")
    assert rows["text"] == ["First paragraph, written by a person.", "", "Second one."]
    with pytest.raises(DistillError, match="data.source_column 'document' is not a column of the train split 'train' "
                                           r"\(columns: text\)"):
        load_split(DataConfig(path=str(corpus), target_column=None), "train", "train")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n=30, bad=None):
    """n good rows; ``bad`` maps a row number to the summary it holds instead."""
    rows = [{"document": f"d{i}", "summary": f"s{i}"} for i in range(n)]
    for i, value in (bad or {}).items():
        rows[i]["summary"] = value
    return rows


@pytest.mark.parametrize("bad, message", [
    ({17: None}, "row 17 of the train split 'train' has a null in column 'summary'"),
    ({20: 5, 17: None}, "row 17 of the train split 'train' has a null in column 'summary'"),  # the first one
    ({3: ["a", "b"]}, "row 3 of the train split 'train' has a non-string value (['a', 'b']) in column 'summary'"),
    (dict(enumerate(range(30))), "row 0 of the train split 'train' has a non-string value (0) in column 'summary'"),
])
def test_invalid_values_are_named_up_front(tmp_path, bad, message):
    path = _write_jsonl(tmp_path / "train.jsonl", _rows(bad=bad))
    with pytest.raises(DistillError) as err:
        load_split(DataConfig(path=str(path)), "train", "train")
    assert str(err.value) == f"data: {message} (set data.skip_invalid: true to drop such rows)"


def test_only_the_rows_used_are_checked(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", _rows(bad={17: None}))
    assert len(load_split(DataConfig(path=str(path), max_train_samples=17), "train", "train")) == 17
    with pytest.raises(DistillError, match="row 0 of the eval split 'train\\[17:\\]' has a null in column 'summary'"):
        load_split(DataConfig(path=str(path)), "train[17:]", "eval")
    # a generation input needs no target
    assert len(load_split(DataConfig(path=str(path)), "train", "input", need_target=False)) == 30


def test_skip_invalid_drops_and_counts(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    rows = _rows(bad={17: None, 20: 5})
    rows[2]["document"] = None
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    ds = load_split(DataConfig(path=str(path), skip_invalid=True), "train", "train")
    assert len(ds) == 27 and all(isinstance(r["summary"], str) and isinstance(r["document"], str) for r in ds)
    assert "distill: dropped 3 of 30 rows of the train split 'train'" in capsys.readouterr().out
    monkeypatch.setenv("RANK", "1")
    assert len(load_split(DataConfig(path=str(path), skip_invalid=True), "train", "train")) == 27
    assert capsys.readouterr().out == ""  # rank 0 says it


MALFORMED = '{"document": "x", "summary": \n'


def test_malformed_file_names_the_file_and_the_reason(tmp_path):
    lines = [json.dumps(r) + "\n" for r in _rows(10)]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(lines[:5]) + MALFORMED + "".join(lines[5:]))
    _write_jsonl(data / "validation.jsonl", _rows(3))
    # the validation split is fine, but loading a directory prepares every split
    with pytest.raises(DistillError) as err:
        load_split(DataConfig(path=str(data)), "validation", "eval")
    assert f"(file {data / 'train.jsonl'})" in str(err.value) and "JSON parse error" in str(err.value)
    assert "An error occurred while generating the dataset" not in str(err.value)
    with pytest.raises(DistillError, match="JSON parse error: .* in row 5"):
        load_split(DataConfig(path=str(data / "train.jsonl")), "train", "train")


def test_malformed_csv_says_why(tmp_path, capfd):
    data = tmp_path / "csv"
    data.mkdir()
    (data / "train.csv").write_text("document,summary\na,b\nc,d,e\n")
    with pytest.raises(DistillError) as err:
        load_split(DataConfig(path=str(data)), "train", "train")
    assert str(err.value) == (f"cannot load train split 'train' of dataset '{data}' (file {data / 'train.csv'}): "
                              "Error tokenizing data. C error: Expected 2 fields in line 3, saw 3")
    assert "Failed to read file" not in capfd.readouterr().err  # the one line above says it


def test_no_file_is_blamed_when_each_loads(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", _rows(3))
    with pytest.raises(DistillError) as err:
        load_split(DataConfig(path=str(tmp_path)), "validation", "eval")
    assert str(err.value) == (f"cannot load eval split 'validation' of dataset '{tmp_path}': "
                              "Unknown split \"validation\". Should be one of ['train'].")


def test_loader_workers_default_to_two_on_a_gpu_and_none_on_cpu():
    assert loader_workers(None, gpu=True) == 2 and loader_workers(None, gpu=False) == 0
    assert loader_workers(0, gpu=True) == 0 and loader_workers(3, gpu=False) == 3
