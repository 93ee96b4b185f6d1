"""The real-text builders of the benchmarks: prose paragraphs from reST and rendered man pages."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from benchmarks.prose_corpus import keep, man_paragraphs, rst_paragraphs, split_of  # noqa: E402

RST = """\
:mod:`json` --- JSON encoder and decoder
=======================================

The :class:`JSONDecoder` reads a document written by a person, and ``loads`` returns
the *object* it describes::

    >>> import json
    >>> json.loads('[1]')

This paragraph comes after the literal block and is kept as running text.

.. note::

   A directive's body is not running text.

* a list item
"""

MAN = """\
NAME
       utime - change file last access and modification times

DESCRIPTION
       The utime() system call changes the access and modification times of the inode speci‐
       fied by filename.

           #include <utime.h>
           int utime(const char *filename);
"""


def test_rst_keeps_running_text_with_markup_reduced_to_its_words():
    assert rst_paragraphs(RST) == [
        "The JSONDecoder reads a document written by a person, and loads returns the object it describes.",
        "This paragraph comes after the literal block and is kept as running text."]


def test_man_pages_keep_the_indented_text_and_join_hyphenated_words():
    paragraphs = man_paragraphs(MAN)
    assert "The utime() system call changes the access and modification times of the inode specified by " \
           "filename." in paragraphs
    assert not any("#include" in p for p in paragraphs)


def test_filters_and_splits_are_fixed():
    assert keep("words " * 20, 80) and not keep("x = f(1, 2) + g[3] * 4 / 5;" * 4, 80) and not keep("short", 80)
    assert split_of("usr/share/man/man2/utime.2.gz") == split_of("usr/share/man/man2/utime.2.gz")
    assert {split_of(f"page{i}") for i in range(200)} == {"train", "validation"}


def test_labelled_tasks_parse_their_sources_and_keep_documents_in_one_split():
    from benchmarks.labelled_tasks import by_split, hedge, movie_sentiment, news_similarity, review_sentiment

    assert movie_sentiment("1\t2.27\tA splash.\n2\t-0.3\tTepid.\n3\t-1.5\tDull.\n") == [
        {"text": "A splash.", "label": 1}, {"text": "Dull.", "label": 0}]  # |mean| < 0.5 is neither
    assert hedge('\ufeff"1","Prelingual deafness"\n"-1","This may result in isolation."\n') == [
        {"text": "Prelingual deafness", "label": 0}, {"text": "This may result in isolation.", "label": 1}]
    assert review_sentiment(['[{"text": "Good case.", "class": 1}, {"text": "x", "class": null}]']) == [
        {"text": "Good case.", "label": 1}]
    docs = [f"document {i} about a topic" for i in range(10)]
    matrix = "\n".join("\t".join(str(1.0 if i == j else (i + j) / 20) for j in range(10)) for i in range(10))
    pairs = news_similarity("\n".join(docs), matrix)
    assert [len(pairs[s]) for s in ("test", "validation", "train")] == [1, 1, 15]  # 2 + 2 + 6 documents
    by_doc = {s: {t for p in rows for t in (p["text"], p["text_pair"])} for s, rows in pairs.items()}
    assert not (by_doc["train"] & by_doc["test"]) and not (by_doc["validation"] & by_doc["test"])
    split = by_split([{"text": f"sentence {i}", "label": i % 2} for i in range(300)] + [{"text": "sentence 0", "label": 0}])
    assert sum(map(len, split.values())) == 300 and 15 < len(split["test"]) < 45


def test_the_task_agnostic_table_gives_each_tasks_main_metric_and_the_average(tmp_path):
    import argparse

    from benchmarks.common import Stages
    from benchmarks.task_agnostic import report
    from distill.finetune.metrics import t_interval

    def results(metric, *seeds):
        return {"main_metric": metric, "seeds": [{"test": {metric: v}} for v in seeds],
                "test": {metric: t_interval(seeds)}}

    scores = {"encoder": {"teacher": {"a": results("accuracy", 0.8, 0.9), "b": results("pearson", 0.4, 0.4)},
                          "half depth: MHA": {"a": results("accuracy", 0.7, 0.8), "b": results("pearson", 0.2, 0.3)},
                          "half depth: objective alone": {"a": results("accuracy", 0.6, 0.8),
                                                          "b": results("pearson", 0.2, 0.1)}}}
    sizes = {"a": {"train": 5000, "validation": 300, "test": 200}, "b": {"train": 400, "validation": 40, "test": 45}}
    ce = {"encoder": {"teacher": 5.25, "half depth: MHA": None, "half depth: objective alone": 6.0}}
    st = Stages(tmp_path, 2, "task_agnostic")
    text = report(scores, sizes, ce, st, argparse.Namespace(nproc=2, steps=10, seed=0, seeds=2, finetune_epochs=2,
                                                            finetune_lr=1e-3, finetune_train_samples=2400))
    # averages over tasks per seed: teacher 0.60, 0.65; MHA 0.45, 0.55; baseline 0.40, 0.45
    # (t(0.975, 1) = 12.706: half widths 12.706 * s / sqrt(2))
    assert "| teacher | 5.250 | 0.850 [0.215, 1.485] | 0.400 [0.400, 0.400] | 0.625 [0.307, 0.943] | – |" in text
    assert "| half depth: MHA | – | 0.750 [0.115, 1.385] | 0.250 [-0.385, 0.885] | 0.500 [-0.135, 1.135] " \
           "| +0.075 [-0.243, +0.393] |" in text
    assert "| half depth: objective alone | 6.000 |" in text and text.count("| – |") == 3
    assert "a 2400/300/200, b 400/40/45" in text  # the training rows a fine-tune draws from


def test_every_task_agnostic_student_runs_with_its_methods_own_settings():
    """Each method's settings reach its command and no shared setting after them undoes one (a later key=value
    wins), for both student shapes."""
    import argparse

    from benchmarks.task_agnostic import FAMILIES, student_overrides

    a = argparse.Namespace(steps=10, lr=1e-3, batch=4, seed=0, eval_every=5, d_model=64)
    for _, _, methods in FAMILIES.values():
        for method, (_, overrides) in methods.items():
            for shape in ("half depth", "half depth, half width"):
                command = student_overrides(a, shape, method, overrides, Path("s"), Path("t"), ["data.path=d"])
                final = dict(o.split("=", 1) for o in command)
                assert all(final[o.split("=", 1)[0]] == o.split("=", 1)[1] for o in overrides), (method, command)
                assert ("loss.hidden.projection=true" in command) == ("width" in shape and "HS" in method)
