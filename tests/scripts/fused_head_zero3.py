"""Run under the deepspeed launcher: for each teacher/student pair under the directory given (each a
``teacher/`` and a ``student/`` model directory) and each student setting named, one ``train_step`` of
CE (label smoothing) + forward KL + logit MSE through the fused head, both models partitioned under
ZeRO-3; and, on whole copies of the same models, the unfused path: the models' own full logits and the
losses written plainly. Prints, per case, the relative differences of the step's loss, of the whole
gradient, and of each parameter's gradient (the largest over the parameters whose gradient is above
float noise), as JSON lines on rank 0.

Settings: ``zero3`` (ds_configs/student_zero3.json), ``offload`` (student_zero3_offload.json, parameters
and optimizer on the CPU), ``frozen`` (zero3 with the input embeddings frozen: a tied head then trains
nothing, an untied one still does)."""

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_grad
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from distill.config.parsing import load_config
from distill.config.settings import ModelConfig
from distill.data.collate import IGNORE_INDEX, shift_right, source_index, target_index
from distill.losses.objective import Objective
from distill.models.capture import FeatureModel
from distill.models.loading import hidden_size, load_model, load_model_config
from distill.runtime.process_group import exit_rank, join_process_group
from distill.runtime.dsconfig import read_ds_config, resolve_ds_config
from distill.train.step import Models, train_step
from distill.train.timing import PhaseTimer

DS = {"zero3": "ds_configs/student_zero3.json", "offload": "ds_configs/student_zero3_offload.json",
      "frozen": "ds_configs/student_zero3.json"}
TAU, W_CE, W_KD, W_MSE, SMOOTHING = 2.0, 1.0, 1.0, 0.1, 0.1


def batch_for(config, rank: int) -> dict:
    """A micro-batch with padding, different on each rank."""
    g = torch.Generator().manual_seed(rank)
    vocab, pad = config.vocab_size, config.pad_token_id
    if config.is_encoder_decoder:
        ids = torch.randint(3, vocab, (2, 7), generator=g)
        ids[1, 5:] = pad
        labels = torch.randint(3, vocab, (2, 5), generator=g)
        labels[0, 4:] = IGNORE_INDEX
        batch = {"input_ids": ids, "attention_mask": (ids != pad).long(), "labels": labels,
                 "decoder_input_ids": shift_right(labels, config.decoder_start_token_id, pad)}
    else:
        ids = torch.randint(3, vocab, (2, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        ids[mask == 0] = pad
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, 2:-1] = ids[:, 3:]  # the prompt is two tokens; labels[t] is the token at t + 1
        labels[(mask == 0) | (mask.roll(-1, 1) == 0)] = IGNORE_INDEX
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
                 "position_ids": torch.arange(ids.shape[1]).repeat(2, 1)}
    return {**batch, "target_index": target_index(batch["labels"]), "source_index": source_index(batch["attention_mask"])}


class GradProbe:
    """The student engine, with every parameter's full gradient read just before the optimizer step."""

    def __init__(self, engine):
        self.engine, self.grads = engine, {}

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self):
        self.grads = {name.removeprefix("model."): safe_get_full_grad(p).clone()
                      for name, p in self.engine.module.named_parameters() if p.requires_grad}
        self.engine.step()

    def get_global_grad_norm(self):
        return self.engine.get_global_grad_norm()


def engines(pair: Path, setting: str, run):
    world = dist.get_world_size()
    out = {}
    for role, ds_path in (("teacher", "ds_configs/teacher_zero3.json"), ("student", DS[setting])):
        mc = ModelConfig(path=str(pair / role), ds_config=ds_path)
        config = load_model_config(mc, role)
        ds = resolve_ds_config(read_ds_config(ds_path, role), run, role, world, hidden_size(config), "cpu", ds_path)
        model, keep = load_model(mc, config, ds, "fp32")
        if role == "teacher":
            model.requires_grad_(False)
            engine = deepspeed.initialize(model=FeatureModel(model, role="teacher").eval(), config=ds)[0]
        else:
            if setting == "frozen":
                model.get_input_embeddings().weight.requires_grad_(False)
            wrapped = FeatureModel(model, role="student")
            engine = deepspeed.initialize(model=wrapped, config=ds,
                                          model_parameters=[p for p in wrapped.parameters() if p.requires_grad])[0]
        out[role] = (engine, config, keep)
    return out


def unfused(pair: Path, setting: str, batch: dict) -> tuple[torch.Tensor, dict]:
    """The step's loss and gradients the plain way, summed over the ranks."""
    unset_hf_deepspeed_config()
    models = {}
    for role in ("teacher", "student"):
        auto = AutoModelForSeq2SeqLM if "decoder_input_ids" in batch else AutoModelForCausalLM
        models[role] = auto.from_pretrained(pair / role, dtype=torch.float32)
    student, teacher = models["student"], models["teacher"].requires_grad_(False)
    if setting == "frozen":
        student.get_input_embeddings().weight.requires_grad_(False)
    keys = ("input_ids", "attention_mask", "decoder_input_ids") if "decoder_input_ids" in batch else \
        ("input_ids", "attention_mask", "position_ids")
    inputs = {k: batch[k] for k in keys}
    s = student(**inputs, use_cache=False).logits
    with torch.no_grad():
        t = teacher(**inputs, use_cache=False).logits
    real = batch["labels"] != IGNORE_INDEX
    s, t, labels = s[real], t[real], batch["labels"][real]
    v = min(s.shape[-1], t.shape[-1])
    ce = F.cross_entropy(s, labels, reduction="sum", label_smoothing=SMOOTHING)
    kd = TAU**2 * F.kl_div(F.log_softmax(s[:, :v] / TAU, -1), F.softmax(t[:, :v] / TAU, -1), reduction="sum")
    mse = (s[:, :v] - t[:, :v]).pow(2).sum()
    count = torch.tensor(float(real.sum()))
    dist.all_reduce(count)
    loss = (W_CE * ce + W_KD * kd + W_MSE * mse) / count
    loss.backward()
    grads = {name: p.grad for name, p in student.named_parameters() if p.requires_grad}
    for g in grads.values():
        dist.all_reduce(g)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total, grads


def main() -> None:
    join_process_group()
    args = [a for a in sys.argv[1:] if not a.startswith("--")]  # the launcher adds --local_rank
    root, settings = Path(args[0]), args[1].split(",")
    rank, world = dist.get_rank(), dist.get_world_size()
    for pair in sorted(p for p in root.iterdir() if p.is_dir()):
        for setting in settings:
            run = load_config(None, [f"student.path={pair / 'student'}", f"teacher.path={pair / 'teacher'}",
                                     "student.ds_config=x", "teacher.ds_config=x", "data.path=x", "training.output_dir=x",
                                     "training.micro_batch_size=2", f"loss.w_ce={W_CE}", f"loss.w_kd={W_KD}",
                                     f"loss.w_mse={W_MSE}", f"loss.temperature={TAU}",
                                     f"loss.label_smoothing={SMOOTHING}", "loss.logit_chunk_mib=0.01"])
            built = engines(pair, setting, run)
            (student, s_config, _), (teacher, t_config, _) = built["student"], built["teacher"]
            objective = Objective(run.loss, 10, s_config, t_config, partitioned_student=True)
            batch = batch_for(s_config, rank)
            probe = GradProbe(student)
            models = Models(probe, teacher, s_config.is_encoder_decoder, loss_scale=world)
            result = train_step(models, objective, [batch], [True], lambda x: (dist.all_reduce(x), x)[1],
                                PhaseTimer(torch.device("cpu")))
            fused = result.terms["total"].detach().clone()
            dist.all_reduce(fused)
            reference, ref_grads = unfused(pair, setting, batch)
            assert set(probe.grads) == set(ref_grads), sorted(set(probe.grads) ^ set(ref_grads))
            # per parameter, among those whose gradient is not float noise (a key bias gets none: softmax ignores it)
            scale = torch.stack([g.norm() for g in ref_grads.values()]).norm()
            diff = torch.stack([(probe.grads[n] - g).norm() for n, g in ref_grads.items()]).norm()
            worst = max(((probe.grads[n] - g).norm() / g.norm()).item() for n, g in ref_grads.items()
                        if g.norm() > 1e-3 * scale)
            if rank == 0:
                print(json.dumps({"pair": pair.name, "setting": setting, "loss": fused.item(),
                                  "loss_rel": abs(fused.item() - reference.item()) / abs(reference.item()),
                                  "grad_rel": (diff / scale).item(), "grad_rel_max": worst, "params": len(ref_grads),
                                  "head_trained": student.module.head.weight.requires_grad}), flush=True)
            del built, student, teacher, probe, models


if __name__ == "__main__":
    main()
    exit_rank(0)
