"""The Objective: the trainer's contract (counts, totals, weighted sum), normalization across
micro-batches and ranks, no host sync in the loss path, the ZeRO-3 rule, and state across steps."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from test_terms_fakes import (STUDENT, TEACHER, all_terms, logit_sums, logits_output, make_batch, outputs, rows, term_weights,
                              with_indices)

from distill.config.loss import LossConfig
from distill.losses.objective import Objective
from distill.losses.terms import COUNTS, TERMS


def totals_of(objective, micro_batches, dtype=torch.float64):
    """The trainer's totals: each count summed over the step's micro-batches (and ranks)."""
    counts = [objective.counts(batch, gold) for batch, gold in micro_batches]
    return torch.tensor([sum(c) for c in zip(*counts)], dtype=dtype)


def test_contract_surface():
    objective = Objective(all_terms(), 10, STUDENT, TEACHER)
    assert [t.name for t in objective.terms] == list(TERMS)
    assert objective.needs_teacher and objective.captures_attention
    assert objective.count_names == tuple(name for name in COUNTS
                                          if any(name in t.parts.values() for t in objective.terms))
    batch = make_batch(0)
    n_t, n_s = int((batch["labels"] != -100).sum()), int(batch["attention_mask"].sum())
    per_count = {"target": (n_t, n_t), "target_gold": (n_t, 0), "source": (n_s, n_s)}
    assert objective.counts(batch, gold=True) == [per_count[name][0] for name in objective.count_names]
    assert objective.counts(batch, gold=False) == [per_count[name][1] for name in objective.count_names]
    assert objective.weights() == term_weights()
    assert {k: tuple(m.weight.shape) for k, m in objective.build_projections(torch.float32).items()} == {
        "hidden_encoder": (32, 16), "hidden_decoder": (32, 16)}
    ce_only = Objective(LossConfig(), 10, STUDENT)
    assert ce_only.count_names == ("target_gold",) and not ce_only.needs_teacher and not ce_only.student_request
    with pytest.raises(ValueError, match="one count per name"):
        ce_only(batch, *outputs(ce_only, batch, 0), True, torch.ones(2))


@pytest.mark.parametrize("splits", [[(0, 5)], [(0, 1), (1, 3), (3, 5)], [(0, 2), (2, 3), (3, 4), (4, 5)]])
@pytest.mark.parametrize("seed", [0, 1])
def test_micro_batches_add_up_to_the_whole_batch(splits, seed):
    """Summing obj(...) over micro-batches, with the step's totals, gives the un-split batch's value:
    the loss and every term, float64 to 1e-10, whatever the split (a micro-batch may have no target)."""
    objective = Objective(all_terms(), 10, STUDENT, TEACHER)
    projections = objective.build_projections(torch.float64)
    batch = make_batch(seed, dec_lengths=[3, 0, 6, 1, 4])
    student, teacher = outputs(objective, batch, seed, projections=projections)
    whole, whole_terms, _ = objective(batch, student, teacher, True, totals_of(objective, [(batch, True)]))
    micro = [(rows(batch, student, a, b), rows(batch, teacher, a, b)[1]) for a, b in splits]
    totals = totals_of(objective, [(m, True) for (m, _), _ in micro])
    results = [objective(m, s, t, True, totals) for (m, s), t in micro]
    assert_close(sum(total for total, _, _ in results), whole, rtol=1e-10, atol=1e-12)
    for name, value in whole_terms.items():
        assert_close(sum(terms[name] for _, terms, _ in results), value, rtol=1e-10, atol=1e-12)
    # and it is the weighted sum of the terms
    weights = objective.weights()
    assert_close(whole, sum(w * whole_terms[k] for k, w in weights.items()), rtol=1e-12, atol=0)


def test_a_micro_batch_with_one_target_weighs_one_token_of_the_step():
    objective = Objective(LossConfig(w_ce=0.0, w_kd=1.0), 10, STUDENT, TEACHER)
    batch = make_batch(2, b=3, dec_lengths=[1, 6, 5])
    student, teacher = outputs(objective, batch, 2)
    micro = [(rows(batch, student, 0, 1), rows(batch, teacher, 0, 1)[1]),
             (rows(batch, student, 1, 3), rows(batch, teacher, 1, 3)[1])]
    totals = totals_of(objective, [(m, True) for (m, _), _ in micro])
    assert totals.tolist() == [12.0]
    (one, s1), t1 = micro[0]
    kd = TERMS["kd"](LossConfig(w_ce=0.0, w_kd=1.0), 10, STUDENT, TEACHER)
    per_token = logit_sums(kd, one, s1, t1)["kd"]
    assert_close(objective(one, s1, t1, True, totals)[0], per_token / 12, rtol=1e-12, atol=0)  # 1/N, not 1/k
    mean = logit_sums(kd, batch, student, teacher)["kd"] / 12
    assert_close(sum(objective(m, s, t, True, totals)[0] for (m, s), t in micro), mean, rtol=1e-12, atol=0)


def test_on_policy_micro_batches_leave_cross_entropy_to_the_gold_ones():
    objective = Objective(all_terms(), 10, STUDENT, TEACHER)
    batch = make_batch(3, dec_lengths=[2, 5, 6, 1, 3])
    student, teacher = outputs(objective, batch, 3, projections=objective.build_projections(torch.float64))
    splits, gold = [(0, 2), (2, 4), (4, 5)], [True, False, True]
    micro = [(rows(batch, student, a, b), rows(batch, teacher, a, b)[1]) for a, b in splits]
    totals = totals_of(objective, [(m, g) for ((m, _), _), g in zip(micro, gold)])
    assert totals.tolist()[:2] == [17.0, 10.0]  # targets: 2+5+6+1+3; gold targets: rows 0-1 and 4 only
    results = [objective(m, s, t, g, totals)[1] for ((m, s), t), g in zip(micro, gold)]
    assert "ce" not in results[1] and "kd" in results[1]
    ce_gold = logit_sums(objective.terms[0], *rows(batch, student, 0, 2), None)["ce"] + \
        logit_sums(objective.terms[0], *rows(batch, student, 4, 5), None)["ce"]
    assert_close(results[0]["ce"] + results[2]["ce"], ce_gold / 10, rtol=1e-12, atol=0)


def _forbid_host_reads(monkeypatch):
    """Make every way a tensor's value reaches the host fail: reads, truth tests, boolean selection."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("the loss path read a tensor back to the host")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "masked_select"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for name in ("nonzero", "masked_select"):
        monkeypatch.setattr(torch, name, refuse)
    getitem, setitem = torch.Tensor.__getitem__, torch.Tensor.__setitem__

    def no_mask(key):
        keys = key if isinstance(key, tuple) else (key,)
        if any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys):
            raise AssertionError("boolean indexing: its result's size needs the device")

    def checked_getitem(self, key):
        no_mask(key)
        return getitem(self, key)

    def checked_setitem(self, key, value):
        no_mask(key)
        setitem(self, key, value)

    monkeypatch.setattr(torch.Tensor, "__getitem__", checked_getitem)
    monkeypatch.setattr(torch.Tensor, "__setitem__", checked_setitem)


def test_the_loss_path_never_syncs(monkeypatch):
    """KD (TAID, adaptive λ) + hidden + attention + relation + CE + MSE, forward, backward, step_end and
    logging values, with every host read of a tensor made to fail."""
    cfg = all_terms(divergence="taid", taid_schedule="adaptive")
    objective = Objective(cfg, 10, STUDENT, TEACHER, partitioned_student=True)
    projections = objective.build_projections(torch.float32)
    batch = make_batch(4)
    student, teacher = outputs(objective, batch, 4, dtype=torch.float32)
    totals = totals_of(objective, [(batch, True)], dtype=torch.float32)
    lam_before = objective.schedule_values()["taid_lambda"].clone()
    _forbid_host_reads(monkeypatch)
    objective.project(student.features, projections)
    counts = objective.counts(batch, True)
    total, terms, _ = objective(batch, student, teacher, True, totals)
    total.backward()
    objective.step_end(1, {k: v.detach() for k, v in terms.items()})
    objective.step_end(2, {k: v.detach() * 0.5 for k, v in terms.items()})
    values = objective.schedule_values()
    monkeypatch.undo()
    assert counts == totals.tolist()
    assert {name for name, cls in TERMS.items() if cls.needs_teacher} <= set(terms) and torch.isfinite(total)
    assert isinstance(values["taid_lambda"], torch.Tensor) and values["taid_lambda"] > lam_before
    assert all(p.grad is not None for p in projections.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_loss_path_never_syncs_on_a_gpu():
    """The same on a GPU, with CUDA's own check: any synchronizing call in the loss path raises."""
    objective = Objective(all_terms(divergence="taid", taid_schedule="adaptive"), 10, STUDENT, TEACHER,
                          partitioned_student=True)
    projections = objective.build_projections(torch.bfloat16).cuda()
    batch = {k: v.cuda() for k, v in make_batch(4).items()}
    steps = [outputs(objective, batch, seed, dtype=torch.bfloat16) for seed in (4, 5)]  # made (copied) up front
    totals = totals_of(objective, [(batch, True)], dtype=torch.float32).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, (student, teacher) in enumerate(steps, start=1):
            objective.project(student.features, projections)
            total, terms, _ = objective(batch, student, teacher, True, totals)
            total.backward()
            objective.step_end(step, {k: v.detach() for k, v in terms.items()})
        lam = objective.schedule_values()["taid_lambda"]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert lam.is_cuda and torch.isfinite(total) and all(p.grad is not None for p in projections.parameters())


def test_gradients_reach_the_student_and_projections_never_the_teacher():
    objective = Objective(all_terms(), 10, STUDENT, TEACHER)
    projections = objective.build_projections(torch.float32)
    batch = make_batch(5)
    student, teacher = outputs(objective, batch, 5, dtype=torch.float32)
    teacher.logits.requires_grad_(True)
    for h in teacher.features.hidden.values():
        h.requires_grad_(True)
    objective.project(student.features, projections)
    total, terms, _ = objective(batch, student, teacher, True, totals_of(objective, [(batch, True)], torch.float32))
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())
    total.backward()
    assert teacher.logits.grad is None and all(h.grad is None for h in teacher.features.hidden.values())
    assert all(p.grad.abs().sum() > 0 for p in projections.parameters())
    assert student.logits.grad.abs().sum() > 0
    assert all(a.query.grad.abs().sum() > 0 for a in student.features.attention.values())


def test_padding_never_changes_the_loss():
    """One more padded position everywhere, holding NaN in every tensor of both models: the same loss."""
    objective = Objective(all_terms(), 10, STUDENT, TEACHER)
    projections = objective.build_projections(torch.float64)
    batch = make_batch(6)
    wide = with_indices({"attention_mask": F.pad(batch["attention_mask"], (0, 1)),
                         "labels": F.pad(batch["labels"], (0, 1), value=-100)})
    (s, t), (s_wide, t_wide) = outputs(objective, batch, 6), outputs(objective, wide, 6)
    with torch.no_grad():
        for small, big in ((s, s_wide), (t, t_wide)):
            pairs = [(small.logits, big.logits)] + [(small.features.hidden[k], big.features.hidden[k])
                                                    for k in small.features.hidden]
            pairs += [(getattr(small.features.attention[k], x), getattr(big.features.attention[k], x))
                      for k in small.features.attention for x in ("query", "key", "value")]
            for x, y in pairs:
                y.fill_(float("nan"))[tuple(slice(0, n) for n in x.shape)] = x
    s_wide, t_wide = (logits_output(o.logits, wide["target_index"], o.features) for o in (s_wide, t_wide))
    losses = []
    for b_, s_, t_ in ((batch, s, t), (wide, s_wide, t_wide)):
        objective.project(s_.features, projections)
        losses.append(objective(b_, s_, t_, True, totals_of(objective, [(b_, True)]))[1])
    assert set(losses[0]) == set(losses[1])
    for name, value in losses[0].items():
        assert torch.isfinite(value) and value > 0
        assert_close(losses[1][name], value, rtol=1e-12, atol=0, msg=name)


@pytest.mark.parametrize("partitioned", [True, False])
def test_feature_terms_alone_keep_the_logits_in_the_graph_under_zero3(partitioned):
    cfg = LossConfig(w_ce=0.0, w_hid=1.0)
    cfg.hidden.map, cfg.hidden.projection = "uniform", True
    objective = Objective(cfg, 10, STUDENT, TEACHER, partitioned_student=partitioned)
    batch = make_batch(7)
    student, teacher = outputs(objective, batch, 7, projections=objective.build_projections(torch.float64))
    total, _, _ = objective(batch, student, teacher, True, totals_of(objective, [(batch, True)]))
    total.backward()
    assert (student.logits.grad is not None) == partitioned
    if partitioned:
        assert (student.logits.grad == 0).all()


def test_taid_state_steps_on_the_device_and_survives_a_resume():
    cfg = LossConfig(w_ce=0.0, w_kd=1.0, divergence="taid", taid_schedule="adaptive")
    objective = Objective(cfg, 100, STUDENT, TEACHER)
    assert objective.tracks_losses
    losses = [torch.tensor(x) for x in (4.0, 3.0, 2.5, 2.0, 1.5)]
    for step, loss in enumerate(losses[:3], start=1):
        objective.step_end(step, {"kd": loss})
    saved = objective.state_dict()
    assert saved["step"] == 3 and set(saved["taid"]) == {"value", "step", "m", "prev_loss"}
    resumed = Objective(cfg, 100, STUDENT, TEACHER)
    resumed.load_state_dict(saved)
    for step, loss in enumerate(losses[3:], start=4):
        objective.step_end(step, {"kd": loss})
        resumed.step_end(step, {"kd": loss})
    assert torch.equal(objective.schedule_values()["taid_lambda"], resumed.schedule_values()["taid_lambda"])
    linear = Objective(LossConfig(w_ce=0.0, w_kd=1.0, divergence="taid"), 100, STUDENT, TEACHER)
    assert not linear.tracks_losses  # the linear λ needs no loss: no per-step reduction either
    linear.step_end(50)
    assert linear.schedule_values()["taid_lambda"].item() == pytest.approx(0.55)
