"""Elastic resume on CPU ranks under the real deepspeed launcher: a run stopped on 2 ranks continues on 1,
and one stopped on 1 continues on 2, through DeepSpeed's universal checkpoint, with the losses, the
learning rate, TAID's λ, the best record and every step's examples of a run that never stopped.

Each family (a tiny BART pair with KD, CE and hidden states through a learned projection; a tiny
LLaMA-style pair with adaptive TAID) runs 6 steps uninterrupted on 2 ranks and on 1, with a global batch of
8 from 20 examples (2 steps per epoch, so the resumed part crosses epochs). A resume starts from the step-3
checkpoint of a copy of one run, on the other number of ranks, and is compared with the run it was copied
from. Dropout is off: a change of world size draws new dropout masks (README). The uninterrupted runs share
one launch per world size: a launch costs more than such a run."""

import json
import shutil
from pathlib import Path

import pytest

from distill.files import write_atomic
from distill.train import checkpoint, universal
from distill.train.example_ids import DIRECTORY
from ranks import launch_run, launch_jobs, metrics

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.integration

STEPS, CUT = 6, 3
COMMON = [f"training.max_steps={STEPS}", f"training.save_every={CUT}", "training.keep_checkpoints=3",
          "training.log_every=1", "training.warmup_steps=0", "training.learning_rate=3e-3",
          "training.micro_batch_size=4", f"training.eval_every={CUT}", "eval.generate=false",
          "eval.best_metric=eval/ce", "data.max_train_samples=20", "data.max_eval_samples=8",
          "training.record_example_ids=true", "training.export=false"]
ACCUMULATION = {2: 1, 1: 2}  # a global batch of 8 on either
COMPARED = ("loss/total", "train/lr", "train/grad_norm", "eval/ce")


def _no_dropout(model_dir: Path) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    for key in ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "classifier_dropout"):
        if key in config:
            config[key] = 0.0
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def families(demo_assets, tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from distill.models.make_student import make_student

    root = tmp_path_factory.mktemp("elastic-models")
    bart = root / "bart-student"
    make_student(str(demo_assets["teacher"]), str(bart), decoder_layers=1)
    tok = AutoTokenizer.from_pretrained(demo_assets["tokenizer"])
    llama_teacher, llama = root / "llama-teacher", root / "llama-student"
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(llama_teacher)
    tok.save_pretrained(llama_teacher)
    make_student(str(llama_teacher), str(llama), decoder_layers=1)
    for student in (bart, llama):
        _no_dropout(student)
    data = f"data.path={demo_assets['data']}"
    bart_pair = [f"teacher.path={demo_assets['teacher']}", f"student.path={bart}", data, "loss.w_hid=1",
                 "loss.hidden.stacks=decoder", "loss.hidden.map=last", "loss.hidden.projection=true"]
    return {
        "bart": (ROOT / "recipes/demo/kd.yaml", bart_pair),
        # a ZeRO-2 student: whole weights on every rank, optimizer state partitioned
        "bart-zero2": (ROOT / "recipes/demo/kd.yaml", [*bart_pair, "student.ds_config=ds_configs/student_zero2.json"]),
        "llama": (ROOT / "recipes/llama_kd.yaml",
                  [f"teacher.path={llama_teacher}", f"student.path={llama}", data, "data.name=null",
                   "data.source_column=document", "data.target_column=summary", "data.train_split=train",
                   "data.eval_split=validation", "data.max_source_length=64", "data.max_target_length=24",
                   "training.precision=fp32", "loss.divergence=taid", "loss.taid_schedule=adaptive"]),
    }


def _job(family, out: Path, nproc: int, extra=()) -> tuple[Path, list[str]]:
    recipe, overrides = family
    return recipe, [*overrides, *COMMON, f"training.gradient_accumulation_steps={ACCUMULATION[nproc]}",
                    f"training.output_dir={out}", *extra]


def _run(family, out: Path, nproc: int, extra=()):
    recipe, overrides = _job(family, out, nproc, extra)
    proc = launch_run(overrides, recipe=recipe, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def uninterrupted_runs(families, tmp_path_factory):
    """{family: {world size: run directory}}: the same 6 steps on 2 ranks and on 1 of each family, and of
    the ZeRO-2 student on 2 ranks; one launch per world size."""
    root = tmp_path_factory.mktemp("elastic")
    runs = {name: {nproc: root / f"{name}-ranks{nproc}" for nproc in (2, 1)} for name in ("bart", "llama")}
    runs["bart-zero2"] = {2: root / "bart-zero2-ranks2"}
    for nproc in (2, 1):
        jobs = [_job(families[name], dirs[nproc], nproc) for name, dirs in runs.items() if nproc in dirs]
        proc = launch_jobs(jobs, root / f"jobs-ranks{nproc}.json", nproc)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return runs


@pytest.fixture(scope="module", params=["bart", "llama"])
def uninterrupted(request, uninterrupted_runs):
    """The family and its {world size: run directory}."""
    return request.param, uninterrupted_runs[request.param]


def example_ids(run: Path) -> dict[int, list[int]]:
    """Each step's global batch: the union of every rank's ids for the step."""
    steps: dict[int, list[int]] = {}
    for path in sorted((run / DIRECTORY).glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["step"], []).extend(row["ids"])
    return {step: sorted(ids) for step, ids in steps.items()}


def assert_same_steps(got: Path, want: Path, steps) -> None:
    a, b = metrics(got), metrics(want)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    keys = [k for k in b[1] if k.startswith(("loss/", "schedule/"))] + list(COMPARED)
    for step in steps:
        for key in keys:
            if key in b[step]:
                assert a[step][key] == pytest.approx(b[step][key], rel=1e-4, abs=1e-7), (step, key)
    ids, reference = example_ids(got), example_ids(want)
    assert ids == reference
    assert sorted(ids) == list(range(1, STEPS + 1)) and all(len(set(v)) == 8 for v in ids.values())
    for epoch in range(STEPS // 2):  # 20 examples, global batch 8: 2 steps per epoch, none seen twice
        seen = ids[2 * epoch + 1] + ids[2 * epoch + 2]
        assert len(set(seen)) == len(seen) == 16


def _flat(value, key="") -> dict:
    """A saved state as {path: number or string}, tensors as their elements, for comparing two states."""
    if isinstance(value, dict):
        return {k: v for name, item in value.items() for k, v in _flat(item, f"{key}/{name}").items()}
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{key}/{i}").items()}
    return {key: value}


def final_state(run: Path) -> dict:
    """What the last checkpoint continues from besides the engine: step, data position, TAID's λ, best record."""
    import torch

    state = torch.load(run / "checkpoints" / checkpoint.tag_for(STEPS) / "trainer_state_rank0.pt", weights_only=False)
    return _flat({k: state[k] for k in ("step", "data", "objective", "best")})


def _resume_copy(run: Path, dst: Path) -> Path:
    """A copy of ``run`` as a run stopped after step 3 would have left it."""
    shutil.copytree(run, dst)
    ckpt = dst / "checkpoints"
    shutil.rmtree(ckpt / checkpoint.tag_for(STEPS))
    write_atomic(ckpt / checkpoint.LATEST, checkpoint.tag_for(CUT))
    return dst


def test_runs_on_either_world_size_take_the_same_steps(uninterrupted):
    """The data order depends on the seed, the epoch and the global batch only; the step's loss is its
    global token average, whatever the split over ranks and accumulation steps."""
    _, runs = uninterrupted
    assert_same_steps(runs[1], runs[2], range(1, STEPS + 1))


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks(uninterrupted, families, tmp_path, before, after):
    name, runs = uninterrupted
    run = _resume_copy(runs[before], tmp_path / "run")
    out = _run(families[name], run, after)
    tag = checkpoint.tag_for(CUT)
    converted = [line for line in out.splitlines() if "converted it to a universal checkpoint" in line]
    assert len(converted) == 1 and f"checkpoint {tag} was written by {before} ranks and this run has {after}" \
        in converted[0], out[-3000:]
    assert (f"this run takes them as {after} ranks x training.micro_batch_size 4 x "
            f"training.gradient_accumulation_steps {ACCUMULATION[after]}") in out
    assert f"resumed from {run / 'checkpoints' / tag} at step {CUT}" in out
    assert_same_steps(run, runs[before], range(CUT + 1, STEPS + 1))
    got, want = final_state(run), final_state(runs[before])
    assert got["/best/step"] == CUT and sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key] == (pytest.approx(value, rel=1e-4) if isinstance(value, float) else value), key
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == after and info["resumed_from"] == tag
    assert checkpoint.world_size_of(run / "checkpoints" / checkpoint.tag_for(STEPS)) == after
    tag_dir = run / "checkpoints" / tag
    assert universal.problem(tag_dir, 0, 1, lambda x: [x]) is None and not list(tag_dir.glob("*.partial"))
    if (name, before) == ("bart", 2):  # once more from the same checkpoint: the converted copy is reused
        out = _run(families[name], run, after, [f"training.resume={tag}", "training.overwrite=true"])
        assert "resuming from its universal copy made earlier" in out and "converted it" not in out
        assert_same_steps(run, runs[before], range(CUT + 1, STEPS + 1))
        # a damaged copy is found and made again; a copy made from another checkpoint is never used
        moment = sorted((tag_dir / universal.UNIVERSAL / "zero").rglob("exp_avg.pt"))[0]
        data = bytearray(moment.read_bytes())
        data[-10] ^= 0x01
        moment.write_bytes(bytes(data))
        found = universal.problem(tag_dir, 0, 1, lambda x: [x])
        assert found == f"{moment.relative_to(tag_dir / universal.UNIVERSAL)} does not match its checksum"
        said = []
        universal.prepare(tag_dir, 2, 1, found, said.append)
        assert len(said) == 1 and f"converted it to a universal checkpoint again (the earlier copy: {found})" in said[0]
        assert universal.problem(tag_dir, 0, 1, lambda x: [x]) is None and not list(tag_dir.glob("*.partial"))
        other = run / "checkpoints" / checkpoint.tag_for(STEPS)
        shutil.copytree(tag_dir / universal.UNIVERSAL, other / universal.UNIVERSAL)
        assert universal.problem(other, 0, 1, lambda x: [x]) == "it was made from another checkpoint"


def _one_error(proc) -> str:
    text = proc.stdout + proc.stderr
    errors = [line for line in text.splitlines() if "distill: error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in text, text[-3000:]
    return errors[0]


@pytest.mark.parametrize("uninterrupted", ["bart"], indirect=True)  # one family: nothing here loads a model
def test_torn_foreign_or_unsplittable_checkpoints_are_one_line(uninterrupted, families, demo_assets, tmp_path):
    name, runs = uninterrupted
    recipe, overrides = families[name]

    def resume(run, nproc, *extra):
        return launch_run([*overrides, *COMMON, f"training.output_dir={run}", *extra], recipe=recipe, nproc=nproc)

    # 3 ranks cannot split a global batch of 8: refused before any model loads, nothing converted
    run = _resume_copy(runs[2], tmp_path / "odd")
    error = _one_error(resume(run, 3))
    assert "global batch is 8 examples per step, which 3 ranks of training.micro_batch_size 4" in error
    assert "resume it on 1, 2, 4 or 8 ranks" in error
    assert not (run / "checkpoints" / checkpoint.tag_for(CUT) / universal.UNIVERSAL).exists()
    # a checkpoint of another student
    error = _one_error(resume(run, 1, "training.gradient_accumulation_steps=2",
                              f"student.path={demo_assets['teacher']}"))
    assert "the checkpoint was trained with student.path=" in error
    # every checkpoint torn: nothing to convert, one line
    torn = _resume_copy(runs[2], tmp_path / "torn")
    for tag in checkpoint.complete_tags(torn / "checkpoints"):
        optim = sorted((torn / "checkpoints" / tag).glob("*optim_states.pt"))[-1]
        optim.write_bytes(optim.read_bytes()[:1000])
    error = _one_error(resume(torn, 1, "training.gradient_accumulation_steps=2"))
    assert "no intact checkpoint" in error and "bytes, " in error
    assert not any((torn / "checkpoints").glob(f"*/{universal.UNIVERSAL}*"))


def test_zero2_student_resumes_on_fewer_ranks(uninterrupted_runs, families, tmp_path):
    """A ZeRO-2 student (whole weights on every rank, optimizer state partitioned) converts the same way."""
    full = uninterrupted_runs["bart-zero2"][2]
    run = _resume_copy(full, tmp_path / "run")
    out = _run(families["bart-zero2"], run, 1)
    assert "was written by 2 ranks and this run has 1: converted it to a universal checkpoint" in out, out[-3000:]
    assert_same_steps(run, full, range(CUT + 1, STEPS + 1))
    copy = run / "checkpoints" / checkpoint.tag_for(CUT) / universal.UNIVERSAL
    assert (copy / "mp_rank_00_model_states.pt").is_file()  # ZeRO-2's one file of weights and schedule
