"""The training step in one process, with engines that behave as DeepSpeed's do: the same global batch
gives the same gradients and losses however it is split over ranks and micro-batches, a non-logging
step asks the host for nothing, and the token counts behind tokens per second."""

import collections
import copy
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distill.config.loss import LossConfig
from distill.config.settings import DataConfig
from distill.data.collate import CausalCollator, Seq2SeqCollator
from distill.losses.objective import Objective
from distill.models.capture import FeatureModel
from distill.runtime.environment import free_port
from distill.runtime.stops import StopVote
from distill.train.divergence import DivergenceWatch
from distill.train.step import Models, token_counts, train_step
from distill.train.timing import PhaseTimer
from distill.train.window import Window

DISTILL = str(Path(__file__).parents[1] / "distill")


class LocalEngine:
    """The calls the step makes of a DeepSpeed engine, in one process, with DeepSpeed's scaling of each
    micro-batch's loss by 1/accumulation steps (the average over ranks is the test's)."""

    def __init__(self, module, accumulation: int):
        self.module, self.accumulation = module, accumulation

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def backward(self, loss):
        (loss / self.accumulation).backward()

    def step(self):
        pass

    def get_global_grad_norm(self):
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.module.parameters()
                                                     if p.grad is not None]))


@pytest.fixture(scope="module")
def setup(demo_assets, pair):
    from datasets import load_dataset
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    teacher_path, student_path = (p.split("=", 1)[1] for p in pair[:2])
    tok = AutoTokenizer.from_pretrained(student_path)
    rows = list(load_dataset(str(demo_assets["data"]), split="train").select(range(8)))
    loss = LossConfig(w_ce=0.3, w_kd=0.7, w_hid=1.0)
    # float64: the split must not change the step beyond summation order, and a KL between a student and
    # the teacher it was copied from is a difference of near-equal sums that float32 would blur
    student_model = AutoModelForSeq2SeqLM.from_pretrained(student_path, attn_implementation="sdpa").eval().double()
    teacher_model = AutoModelForSeq2SeqLM.from_pretrained(teacher_path, attn_implementation="sdpa").eval().double()
    objective = Objective(loss, 10, student_model.config, teacher_model.config)
    teacher = FeatureModel(teacher_model.requires_grad_(False), objective.teacher_request, "teacher")
    collate = Seq2SeqCollator(tok, DataConfig(path="x", max_source_length=64, max_target_length=24),
                              student_model.config.decoder_start_token_id)
    return {"rows": rows, "objective": objective, "teacher": teacher, "student": student_model, "collate": collate}


def _run(setup, ranks: int, micro: int):
    """Gradients (averaged over ranks, as DeepSpeed does) and summed logged terms of one step over the
    same 8 examples, cut into ``ranks`` x (8 / ranks / micro) micro-batches of ``micro`` examples."""
    rows, objective = setup["rows"], setup["objective"]
    per_rank = len(rows) // ranks
    shards = [[setup["collate"](rows[r * per_rank + i:r * per_rank + i + micro]) for i in range(0, per_rank, micro)]
              for r in range(ranks)]
    golds = [True] * (per_rank // micro)
    local = [torch.tensor([sum(c) for c in zip(*(objective.counts(b, True) for b in batches))], dtype=torch.float32)
             for batches in shards]
    total = sum(local)
    grads, terms = [], collections.Counter()
    for r, batches in enumerate(shards):
        module = copy.deepcopy(setup["student"])
        student = FeatureModel(module, objective.student_request, "student")
        models = Models(LocalEngine(student, len(batches)), setup["teacher"], loss_scale=ranks * len(batches))

        def all_reduce(t, r=r):
            assert torch.equal(t, local[r])  # the step hands its own counts to the collective
            return total.clone()

        result = train_step(models, objective, batches, golds, all_reduce, PhaseTimer(torch.device("cpu")))
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
        terms.update({k: float(v) for k, v in result.terms.items()})
    averaged = {n: sum(g[n] for g in grads) / ranks for n in grads[0]}
    return averaged, dict(terms)


def test_split_over_ranks_and_micro_batches_gives_the_same_step(setup):
    reference_grads, reference_terms = _run(setup, ranks=1, micro=8)
    for ranks, micro in ((1, 2), (2, 2), (2, 1), (4, 1)):
        grads, terms = _run(setup, ranks, micro)
        for name, g in reference_grads.items():
            assert torch.allclose(grads[name], g, rtol=1e-8, atol=1e-12), (ranks, micro, name)
        flat = torch.cat([g.flatten() for g in grads.values()])
        ref = torch.cat([g.flatten() for g in reference_grads.values()])
        assert (flat - ref).norm() / ref.norm() < 1e-10, (ranks, micro)
        assert terms.keys() == reference_terms.keys()
        for k, v in reference_terms.items():
            assert terms[k] == pytest.approx(v, rel=1e-10), (ranks, micro, k)


@pytest.fixture
def one_rank_group():
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_non_logging_steps_ask_the_host_for_nothing(setup, one_rank_group, monkeypatch):
    """Three steps of the loop's per-step work (step, window, divergence watch, stop vote) with every host
    read that distill's code could make counted. transformers' own mask preparation reads the padding
    mask to pick SDPA's fast path; that is not distill's and is left out of the count."""
    from deepspeed.accelerator import get_accelerator

    objective = setup["objective"]
    batches = [setup["collate"](setup["rows"][i:i + 2]) for i in range(0, 8, 2)]
    student = FeatureModel(copy.deepcopy(setup["student"]), objective.student_request, "student")
    models = Models(LocalEngine(student, 2), setup["teacher"], loss_scale=2)
    reduce = lambda t: (dist.all_reduce(t), t)[1]  # noqa: E731
    watch = DivergenceWatch(3, torch.device("cpu"), reduce, lambda: None)
    vote, timer, window = StopVote(), PhaseTimer(torch.device("cpu")), Window()
    syncs = collections.Counter()

    def counting(name, original):
        def wrapper(*args, **kwargs):
            caller = traceback.extract_stack(limit=3)[0].filename
            if caller.startswith(DISTILL):
                syncs[f"{name} at {caller}"] += 1
            return original(*args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    accelerator = get_accelerator()
    monkeypatch.setattr(accelerator, "synchronize", counting("synchronize", accelerator.synchronize))
    for step in range(3):
        mine = batches[2 * (step % 2):2 * (step % 2) + 2]
        result = train_step(models, objective, mine, [True, True], reduce, timer)
        window.add(result, [True, True])
        watch.add(result.nonfinite)
        objective.step_end(step + 1, None)
        assert vote.poll(False) is False
    vote.close()
    assert not syncs, dict(syncs)


class StandIn:
    """An engine whose forwards give fixed outputs in turn (the GPU test's models: transformers' own mask
    preparation syncs, and that is not distill's to avoid)."""

    def __init__(self, outputs):
        self.outputs, self.given = iter(outputs), []

    def __call__(self, rows, features, loss=None, **inputs):
        output = next(self.outputs)
        self.given.append(output)
        return output if loss is None else loss(output)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass

    def get_global_grad_norm(self):
        return torch.linalg.vector_norm(torch.stack([o.logits.grad.norm() for o in self.given]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_step_never_syncs_on_a_gpu():
    """Three steps of two micro-batches under CUDA's own check (any synchronizing call raises): the token
    counts reach the device from pinned memory without a blocking copy (a plain ``torch.tensor(counts,
    device=...)`` raises here), and every term, flag and timing stays on the device."""
    from test_terms_fakes import STUDENT, TEACHER, all_terms, make_batch, outputs

    device = torch.device("cuda")
    objective = Objective(all_terms(), 10, STUDENT, TEACHER, partitioned_student=True)
    projections = objective.build_projections(torch.float32).to(device)
    batches = [{k: v.to(device) for k, v in make_batch(seed).items()} for seed in range(6)]
    batches = [{**b, "input_ids": torch.ones_like(b["attention_mask"]), "decoder_input_ids": torch.ones_like(b["labels"])}
               for b in batches]
    made = [outputs(objective, b, seed, dtype=torch.float32, projections=projections) for seed, b in enumerate(batches)]
    models = Models(StandIn([s for s, _ in made]), StandIn([t for _, t in made]), loss_scale=2)
    timer = PhaseTimer(device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [train_step(models, objective, batches[i:i + 2], [True, True], lambda t: t, timer)
                   for i in range(0, 6, 2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(r.terms["total"].is_cuda and not r.nonfinite for r in results)


def test_tokens_are_counted_once_for_both_model_kinds(tokenizer):
    """Hand counts: "a b c" -> "d e" as an encoder-decoder pair reads 3 + 1 (EOS) source and 2 + 1 target
    tokens; as one decoder-only sequence "a b c d e </s>" it reads 6 tokens once, 3 of them targets."""
    tok = tokenizer
    rows = [{"document": "alpha beta gamma", "summary": "delta epsilon"}]
    n_src = len(tok("alpha beta gamma")["input_ids"])
    n_tgt = len(tok(text_target="delta epsilon")["input_ids"])
    seq2seq = Seq2SeqCollator(tok, DataConfig(path="x"), 2)(rows)
    assert token_counts(seq2seq, encoder_decoder=True) == (n_src, n_tgt)
    causal = CausalCollator(tok, DataConfig(path="x", chat_template=False))(rows)
    real = int(causal["attention_mask"].sum())
    source, target = token_counts(causal, encoder_decoder=False)
    assert source + target == real  # each token once, not once in the mask and again in the labels
    assert target == int((causal["labels"] != -100).sum()) and 0 < target < real
