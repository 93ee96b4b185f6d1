"""The teacher cache (``distill cache-teacher``, ``teacher.cache``): what it stores against the teacher
itself, the same cache from 1 rank and from 2 ZeRO-3 ranks, a killed job finished by a rerun, every
refusal (incomplete, truncated, edited, other settings, terms a cache cannot serve), rows in target order
under packing, and training from a cache that keeps every token equal to online KD."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.config.parsing import load_config, load_data_config
from distill.config.settings import DataConfig
from distill.data import teacher_cache as tc
from distill.data.collate import CausalCollator, Seq2SeqCollator
from distill.errors import DistillError
from distill.infer.cache_teacher import CacheSettings, cache_teacher
from distill.losses.terms import TERMS
from ranks import ENV, ROOT, launch, launch_jobs, metrics, resumed_metrics

KD = ROOT / "recipes/demo/kd.yaml"
SETTINGS = dict(top_k=16, batch_size=8, shard_examples=16)


def _data(demo_assets, *overrides: str) -> DataConfig:
    return load_data_config(KD, ["data.max_train_samples=48", *overrides], str(demo_assets["data"]))


def _cache(demo_assets, out: Path, **kw) -> Path:
    cache_teacher(str(demo_assets["teacher"]), None, _data(demo_assets), "train", out, CacheSettings(**{**SETTINGS, **kw}),
                  torch.device("cpu"), say=lambda text: None)
    return out


def _all_rows(path: Path) -> list[dict[str, torch.Tensor]]:
    cache = tc.TeacherCache(path)
    return [cache.rows(i) for i in range(cache.examples)]


def _assert_same_rows(a: Path, b: Path) -> None:
    rows_a, rows_b = _all_rows(a), _all_rows(b)
    assert len(rows_a) == len(rows_b)
    for i, (x, y) in enumerate(zip(rows_a, rows_b)):
        for part in tc.TEACHER_KEYS.values():
            assert torch.equal(x[part], y[part]), (i, part)


@pytest.fixture(scope="module")
def one_rank(demo_assets, tmp_path_factory):
    return _cache(demo_assets, tmp_path_factory.mktemp("cache") / "one")


def test_cache_holds_the_teachers_top_k_of_every_training_target(one_rank, demo_assets):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    cache = tc.TeacherCache(one_rank)
    index = cache.index
    assert index["examples"] == 48 and len(index["shards"]) == 3 and cache.top_k == 16
    # the training collator's targets, with the teacher's own logits
    tok = AutoTokenizer.from_pretrained(demo_assets["teacher"])
    model = AutoModelForSeq2SeqLM.from_pretrained(demo_assets["teacher"]).eval()
    data = _data(demo_assets)
    from distill.data.loading import load_split

    train = load_split(data, "train", "train")
    collate = Seq2SeqCollator(tok, data, model.config.decoder_start_token_id)
    total = 0
    for i in (0, 17, 47):
        batch = collate([train[i]])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           decoder_input_ids=batch["decoder_input_ids"]).logits
        z = logits.reshape(-1, logits.shape[-1]).index_select(0, batch["target_index"])[:, :len(tok)]
        rows = cache.rows(i)
        values, ids = z.topk(16, dim=-1)
        assert torch.equal(rows["ids"], ids)
        torch.testing.assert_close(rows["logits"].float(), values, atol=2e-2, rtol=1e-3)  # stored as fp16
        lse = z.logsumexp(-1)
        torch.testing.assert_close(rows["lse"], lse)
        rest = z.scatter(-1, ids, float("-inf")).logsumexp(-1) - lse
        torch.testing.assert_close(rows["log_tail"], rest)
        torch.testing.assert_close((values - lse[:, None]).exp().sum(-1) + rest.exp(), torch.ones(len(z)))
    total = sum(cache.rows(i)["lse"].shape[0] for i in range(48))
    assert index["target_rows"] == total
    # uint16 ids (the vocabulary fits), fp16 logits, fp32 lse and tail: 16·4 + 8 bytes per token and a header
    assert 72 <= index["bytes"] / total < 80


@pytest.mark.integration
def test_two_zero3_ranks_write_the_same_cache_as_one(one_rank, demo_assets, tmp_path):
    out = tmp_path / "two"
    proc = launch(ROOT / "launchers/distill_cli.py", [
        "cache-teacher", "--model", demo_assets["teacher"], "--data", demo_assets["data"], "--config", KD,
        "--top-k", "16", "--batch-size", "8", "--shard-examples", "16", "--out", out,
        "--ds-config", ROOT / "ds_configs/teacher_zero3.json", "data.max_train_samples=48"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "48 examples" in proc.stdout
    assert json.loads((out / tc.INDEX).read_text())["fingerprint"] == tc.TeacherCache(one_rank).fingerprint
    for shard in (one_rank / tc.SHARDS).glob("*.safetensors"):
        assert (out / tc.SHARDS / shard.name).read_bytes() == shard.read_bytes(), shard.name


def test_killed_job_is_finished_by_a_rerun_with_the_same_cache(demo_assets, tmp_path):
    reference = _cache(demo_assets, tmp_path / "reference", batch_size=1, shard_examples=4)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "distill.cli", "cache-teacher", "--model", str(demo_assets["teacher"]),
           "--data", str(demo_assets["data"]), "--config", str(KD), "--top-k", "16", "--batch-size", "1",
           "--shard-examples", "4", "--out", str(out), "data.max_train_samples=48"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while len(tc.done_shards(out)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = tc.done_shards(out)
    assert 2 <= len(done) < 12 and not (out / tc.INDEX).exists()
    with pytest.raises(DistillError, match="incomplete teacher cache"):
        tc.TeacherCache(out)
    subprocess.run(cmd, env=ENV, cwd=ROOT, check=True, capture_output=True)
    _assert_same_rows(out, reference)
    assert json.loads((out / tc.INDEX).read_text())["fingerprint"] == tc.TeacherCache(reference).fingerprint


def test_damaged_caches_are_refused(one_rank, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(one_rank, copy)
    shard = copy / tc.SHARDS / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # the same size, other bytes
    shard.write_bytes(bytes(data))
    cache = tc.TeacherCache(copy)
    cache.rows(0)  # shard 0 is intact
    with pytest.raises(DistillError, match="shard-00001.safetensors does not match its recorded digest"):
        cache.rows(20)
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(DistillError, match="shard-00001.safetensors is .* bytes, .* recorded"):
        tc.TeacherCache(copy)
    (copy / tc.INDEX).unlink()
    with pytest.raises(DistillError, match="incomplete teacher cache"):
        tc.TeacherCache(copy)
    with pytest.raises(DistillError, match="not a teacher cache"):
        tc.TeacherCache(tmp_path)


def test_a_rerun_on_an_edited_complete_cache_recomputes_the_edited_shard(one_rank, demo_assets, tmp_path):
    """It used to say "complete already" without looking: now every shard is read back against its digest,
    and the one that changed is computed again (the others are kept)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(one_rank, copy)
    shard = copy / tc.SHARDS / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    kept = (copy / tc.SHARDS / "shard-00000.safetensors").stat().st_mtime_ns
    said = []
    cache_teacher(str(demo_assets["teacher"]), None, _data(demo_assets), "train", copy, CacheSettings(**SETTINGS),
                  torch.device("cpu"), say=said.append)
    assert said[0] == f"{copy}: shard-00001.safetensors changed after it was written: computing it again", said
    assert (copy / tc.SHARDS / "shard-00000.safetensors").stat().st_mtime_ns == kept
    _assert_same_rows(copy, one_rank)
    said.clear()
    cache_teacher(str(demo_assets["teacher"]), None, _data(demo_assets), "train", copy, CacheSettings(**SETTINGS),
                  torch.device("cpu"), say=said.append)
    assert said == [f"{copy} is complete already (every shard matches its digest)"]


def test_another_cache_in_the_same_directory_is_refused(one_rank, demo_assets, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(one_rank, copy)
    with pytest.raises(DistillError, match="top_k: 16 there, 8 here"):
        _cache(demo_assets, copy, top_k=8)
    with pytest.raises(DistillError, match="shard_examples: 16 there, 8 here"):  # never a mix of shard sizes
        _cache(demo_assets, copy, shard_examples=8)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DistillError, match="holds no teacher cache"):
        _cache(demo_assets, tmp_path / "busy")


def test_a_run_with_other_data_or_tokenizer_settings_is_refused(one_rank, demo_assets, pair, tmp_path, capsys):
    from distill.train.launch import main

    def refusal(*overrides):
        capsys.readouterr()
        code = main(["--config", str(KD), *pair, "teacher.path=", f"teacher.cache={one_rank}", "data.max_train_samples=48",
                     f"training.output_dir={tmp_path / 'run'}", *overrides])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("distill: error: teacher.cache "), err
        assert not (tmp_path / "run").exists()  # refused before anything was written
        return err[0]

    assert "data.max_source_length: 128 there, 64 here" in refusal("data.max_source_length=64")
    assert "data.max_train_samples: 48 there, 40 here" in refusal("data.max_train_samples=40")
    assert "data.source_prefix: '' there, 'summarize: ' here" in refusal("data.source_prefix=summarize: ")
    assert "tokenizer.decoder_start_token_id" in refusal("data.path=" + str(demo_assets["data"]),
                                                        "student.path=" + str(_other_start(pair, tmp_path)))


def _other_start(pair, tmp_path) -> Path:
    """The pair's student with another decoder start token: its targets would be other rows."""
    import shutil

    student = Path(next(p for p in pair if p.startswith("student.path=")).split("=", 1)[1])
    other = tmp_path / "other-start"
    shutil.copytree(student, other)
    config = json.loads((other / "config.json").read_text())
    config["decoder_start_token_id"] = 0
    (other / "config.json").write_text(json.dumps(config))
    return other


def test_terms_a_cache_cannot_serve_are_refused(demo_assets, pair):
    def config(*overrides):
        return load_config(KD, [*pair, "teacher.path=", "teacher.cache=/some/cache", *overrides])

    assert not config().live_teacher and config().teacher_cache == "/some/cache"
    with pytest.raises(DistillError, match="loss.w_mse compares the full logits"):
        config("loss.w_mse=1")
    with pytest.raises(DistillError, match="loss.w_hid > 0 needs the live teacher's features"):
        config("loss.w_hid=1")
    with pytest.raises(DistillError, match="on_policy_fraction needs a live teacher"):
        config("loss.on_policy_fraction=0.5", "data.max_train_samples=null")
    live = load_config(KD, [*pair, "teacher.cache=/some/cache", "loss.w_hid=1"])  # cache + live teacher
    assert live.live_teacher and live.teacher_cache == "/some/cache"
    with pytest.raises(DistillError, match="teacher.path is required"):
        load_config(KD, [*pair, "teacher.path="])


def test_a_cache_alone_serves_exactly_the_terms_that_declare_a_top_k_teacher(pair):
    """Over the registry: each teacher term with a cache and no teacher model runs on the cache when it
    declares ``top_k_teacher``, and is refused in one line naming its weight when it does not."""
    for name, cls in TERMS.items():
        overrides = [*pair, "teacher.path=", "teacher.cache=/some/cache", "loss.w_kd=0", f"loss.w_{name}=1"]
        if not cls.needs_teacher:
            continue
        if cls.top_k_teacher:
            assert not load_config(KD, overrides).live_teacher, name
            continue
        with pytest.raises(DistillError, match=f"^loss.w_{name} ") as refused:
            load_config(KD, overrides)
        assert "\n" not in str(refused.value), name


class _MarkedCache:
    """Rows valued by their example id, as many as the collator makes for each example."""

    def __init__(self, collate: CausalCollator, rows: list[dict]):
        self.counts = [sum(collate.encode(r)[1][1:]) for r in rows]
        self.dir = Path("marked")

    def rows(self, i: int) -> dict[str, torch.Tensor]:
        n = self.counts[i]
        return {"ids": torch.zeros(n, 2, dtype=torch.int64), "logits": torch.zeros(n, 2), "lse": torch.full((n,), float(i)),
                "log_tail": torch.zeros(n)}


def test_cached_rows_follow_the_targets_of_packed_rows(tokenizer):
    texts = [{"document": "Anna Berg lives in Oslo " * (1 + i % 3), "summary": f"Anna {i} Oslo"} for i in range(7)]
    cfg = DataConfig(path="x", max_source_length=24, max_target_length=8, packing=True)
    collate = CausalCollator(tokenizer, cfg, pack_length=40)
    cache = _MarkedCache(collate, texts)
    order = [5, 2, 6, 0, 3]
    batch = tc.CachedTeacherCollator(collate, cache)([{**texts[i], tc.ID_KEY: i} for i in order])
    assert batch["input_ids"].shape[0] < len(order)  # some rows hold several examples
    # the example of each target position, read off where the position ids restart
    owner = []
    queue = iter(order)
    for b in range(batch["input_ids"].shape[0]):
        current = None
        for t in range(batch["input_ids"].shape[1]):
            if batch["attention_mask"][b, t] == 1 and batch["position_ids"][b, t] == 0:
                current = next(queue)
            owner.append(current)
    expected = torch.tensor([float(owner[j]) for j in batch["target_index"].tolist()])
    assert torch.equal(batch["teacher_lse"], expected)
    cache.counts[2] += 1  # a stale cache
    with pytest.raises(DistillError, match="the cache is stale"):
        tc.CachedTeacherCollator(collate, cache)([{**texts[i], tc.ID_KEY: i} for i in order])


@pytest.mark.integration
def test_training_from_a_cache_of_every_token_equals_online_kd_and_resumes_exactly(demo_assets, pair, tmp_path):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(demo_assets["teacher"]))
    cache = _cache(demo_assets, tmp_path / "full", top_k=vocab)
    common = ["data.max_train_samples=48", "training.max_steps=4", "training.warmup_steps=0", "training.log_every=1",
              "training.micro_batch_size=4", "training.eval_every=0", "training.save_every=2", "eval.generate=false",
              "training.export=false", "loss.divergence=reverse_kl"]
    # one launch, the cached run first (nothing of the online run in its processes before it)
    runs = launch_jobs([(KD, [*pair, *common, "teacher.path=", f"teacher.cache={cache}",
                              f"training.output_dir={tmp_path / 'cached'}"]),
                        (KD, [*pair, *common, f"training.output_dir={tmp_path / 'online'}"])], tmp_path / "jobs.json")
    assert runs.returncode == 0, runs.stdout[-2000:] + runs.stderr[-2000:]
    assert "teacher" not in json.loads((tmp_path / "cached" / "run_info.json").read_text())  # no teacher loaded
    a, b = metrics(tmp_path / "online"), metrics(tmp_path / "cached")
    for step in (1, 2, 3, 4):
        # fp16 logits in the cache: close, not equal; a misaligned row would differ by orders of magnitude
        assert b[step]["loss/kd"] == pytest.approx(a[step]["loss/kd"], rel=5e-3), step
        assert b[step]["loss/ce"] == pytest.approx(a[step]["loss/ce"], rel=1e-4), step
        assert b[step]["agreement/top1"] == pytest.approx(a[step]["agreement/top1"], abs=0.02), step
    # resumed from step 2 (the cache read by example id), steps 3-4 as the run that never stopped
    after = resumed_metrics(tmp_path / "cached", tmp_path / "cut", "step-00000002")
    for step in (3, 4):
        for key in ("loss/total", "loss/kd", "train/grad_norm"):
            assert after[step][key] == pytest.approx(b[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_a_decoder_only_cache_matches_the_teacher_on_packed_training_batches(demo_assets, tmp_path):
    """A LLaMA-style teacher's cache, read into packed training batches: each target's cached log-sum-exp
    and top-1 are the teacher's own at that position of the packed row (block-causal attention)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from distill.data.collate import causal_model_inputs
    from distill.data.loading import load_split

    tok = AutoTokenizer.from_pretrained(demo_assets["tokenizer"])
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                           bos_token_id=tok.bos_token_id)).eval()
    teacher.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    data = DataConfig(path=str(demo_assets["data"]), max_source_length=48, max_target_length=16, max_train_samples=12)
    cache_teacher(str(tmp_path / "llama"), None, data, "train", tmp_path / "cache", CacheSettings(top_k=8, batch_size=4),
                  torch.device("cpu"), say=lambda text: None)
    cache = tc.TeacherCache(tmp_path / "cache")
    packed = CausalCollator(tok, DataConfig(**{**data.__dict__, "packing": True}), pack_length=160)
    train = load_split(data, "train", "train")
    order = [7, 0, 3, 11, 5]
    batch = tc.CachedTeacherCollator(packed, cache)([{**train[i], tc.ID_KEY: i} for i in order])
    assert batch["input_ids"].shape[0] < len(order)  # packed
    with torch.no_grad():
        logits = teacher(**causal_model_inputs(batch, packed=True)).logits
    z = logits.reshape(-1, logits.shape[-1]).index_select(0, batch["target_index"])
    torch.testing.assert_close(batch["teacher_lse"], z.logsumexp(-1), rtol=1e-4, atol=1e-4)
    best = batch["teacher_ids"].gather(1, batch["teacher_logits"].float().argmax(-1, keepdim=True)).squeeze(1)
    assert (best == z.argmax(-1)).float().mean() >= 0.95  # near-ties may flip between packed and unpacked


def _bert_on_text(demo_assets, root: Path):
    """A tiny BERT masked LM on the demo tokenizer and a text file of the demo documents."""
    import datasets
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tok = AutoTokenizer.from_pretrained(demo_assets["tokenizer"])
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    texts = datasets.load_dataset(str(demo_assets["data"]), split="train")["document"][:40]
    (root / "corpus.txt").write_text("\n".join(texts) + "\n")
    return root / "bert", root / "corpus.txt"


def test_a_masked_lm_cache_holds_the_teacher_at_the_first_epochs_masks(demo_assets, tmp_path):
    from distill.data.objectives import TextObjectiveCollator, text_blocks
    from distill.data.loading import load_split
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    bert, corpus = _bert_on_text(demo_assets, tmp_path)
    data = DataConfig(path=str(corpus), source_column="text", target_column=None, objective="mlm", block_length=48)
    cache_teacher(str(bert), None, data, "train", tmp_path / "cache", CacheSettings(top_k=8, batch_size=4),
                  torch.device("cpu"), say=lambda text: None, seed=7)
    cache = tc.TeacherCache(tmp_path / "cache")
    tok = AutoTokenizer.from_pretrained(bert)
    blocks = text_blocks(load_split(data, "train", "train"), tok, data)
    assert cache.examples == len(blocks)
    order = [5, 0, 3]  # a training micro-batch of the first epoch, by block id
    batch = tc.CachedTeacherCollator(TextObjectiveCollator(tok, data, 7), cache)(
        [{**blocks[i], tc.ID_KEY: i} for i in order])
    model = AutoModelForMaskedLM.from_pretrained(bert).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    z = logits.reshape(-1, logits.shape[-1]).index_select(0, batch["target_index"])
    torch.testing.assert_close(batch["teacher_lse"], z.logsumexp(-1), rtol=1e-4, atol=1e-4)
    assert torch.equal(batch["teacher_ids"][:, 0], z.argmax(-1))
    with pytest.raises(DistillError, match=r"other data settings \(data.seed"):
        cache.check_run(load_config(None, ["student.path=x", "student.ds_config=x", f"data.path={corpus}",
                                           "data.source_column=text", "data.target_column=null", "data.objective=mlm",
                                           "data.block_length=48", "training.output_dir=x", "training.seed=8",
                                           "teacher.path=", f"teacher.cache={tmp_path / 'cache'}", "loss.w_kd=1"]),
                        blocks, tok, model.config)
