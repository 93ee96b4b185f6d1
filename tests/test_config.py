"""Run config: YAML + overrides, typed, validated up front with errors that name the key."""

import pytest

from distill.config.settings import RunConfig
from distill.config.parsing import load_config, merge_overrides
from distill.errors import DistillError

BASE = """
student: {path: s, ds_config: ds_configs/student_zero3.json}
data: {path: d}
training: {output_dir: out}
"""


@pytest.fixture
def recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(BASE)
    return p


def test_overrides_nested_and_typed(recipe):
    cfg = load_config(recipe, ["training.learning_rate=1e-4", "training.max_steps=7", "loss.w_kd=0.5",
                               "teacher.path=t", "teacher.ds_config=ds_configs/teacher_zero3.json",
                               "data.eval_split=null", "data.truncation=false",
                               "data.source_prefix=summarize: "])
    assert cfg.data.source_prefix == "summarize: "
    assert isinstance(cfg, RunConfig)
    assert cfg.training.learning_rate == 1e-4 and isinstance(cfg.training.learning_rate, float)
    assert cfg.training.max_steps == 7
    assert cfg.teacher.path == "t" and cfg.uses_teacher
    assert cfg.data.eval_split is None and cfg.data.truncation is False
    assert cfg.flat()["training.learning_rate"] == 1e-4


@pytest.mark.parametrize("override, message", [
    ("training.lr=1", "unknown config key 'training.lr'"),
    ("training.learning_rat=1", "(did you mean 'training.learning_rate'?)"),
    ("bogus.x=1", "unknown config key 'bogus'"),
    ("training.max_steps=ten", "config key 'training.max_steps' must be int"),
    ("training.max_steps=1.5", "config key 'training.max_steps' must be int"),
    ("training.export=3", "config key 'training.export' must be bool"),
    ("training.precision=fp8", "config key 'training.precision' must be one of"),
    ("training.max_steps=0", "training.max_steps must be >= 1"),
    ("training.warmup_steps=2000", "training.warmup_steps must be in [0, training.max_steps)"),
    ("loss.temperature=0", "loss.temperature must be > 0"),
    ("loss.w_kd=0.5", "loss.w_kd > 0 needs a teacher"),
    ("loss.w_ce=0", "every loss weight of loss is 0"),
    ("teacher.path=x", "teacher.ds_config is required"),
    ("teacher.bad=x", "unknown config key 'teacher.bad'"),
    ("training=3", "config key 'training' must be a mapping"),
    ("training.max_steps.x=3", "config key 'training.max_steps' must be int"),
    ("nonsense", "is not of the form key=value"),
])
def test_bad_values_name_the_key(recipe, override, message):
    with pytest.raises(DistillError) as err:
        load_config(recipe, [override])
    assert message in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(DistillError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: [unclosed")
    with pytest.raises(DistillError, match="not valid YAML"):
        load_config(bad)


def test_config_file_errors_say_what_is_wrong(tmp_path, monkeypatch):
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(DistillError, match="is not a text file"):
        load_config(binary)
    with pytest.raises(DistillError, match="is a directory: give a YAML file"):
        load_config(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  max_steps: 4\n  seed: [1\n")
    with pytest.raises(DistillError, match="not valid YAML at line 4, column 1: "):
        load_config(bad)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DistillError, match=r"config file not found: demo/kd \(did you mean recipes/demo/kd.yaml\?\)"):
        load_config("demo/kd")


@pytest.mark.parametrize("key", ["training.learning_rate", "loss.w_kd", "loss.temperature"])
@pytest.mark.parametrize("value", ["1e39", "-1e39", "1e-50"])
def test_floats_that_do_not_fit_float32_are_refused(recipe, key, value):
    with pytest.raises(DistillError) as err:
        load_config(recipe, [f"{key}={value}"])
    assert str(err.value).startswith(f"config key '{key}' must fit a 32-bit float"), err.value


@pytest.mark.parametrize("value", ["decoder", "[decoder]", "[ decoder ]", "encoder,decoder", "[encoder, decoder]"])
def test_list_overrides_in_either_form(recipe, value):
    cfg = load_config(recipe, [f"loss.hidden.stacks={value}"])
    assert cfg.loss.hidden.stacks == [s.strip() for s in value.strip("[ ]").split(",")]


def test_merge_overrides_creates_sections():
    assert merge_overrides({}, ["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_every_recipe_validates():
    from pathlib import Path

    recipes = sorted(p for p in Path(__file__).parents[1].glob("recipes/**/*.yaml")
                     if not p.name.startswith("finetune_"))  # distill finetune's (tests/test_finetune.py)
    assert recipes
    for r in recipes:
        load_config(r)


def _float_keys(cls=RunConfig, prefix=""):
    """Every float setting's dotted name (Optional[float] included), found from the annotations."""
    import dataclasses
    import typing

    keys = []
    # the loss section takes each registered term's weight keys in place of its weights field
    hints = cls.setting_hints() if hasattr(cls, "setting_hints") else typing.get_type_hints(cls)
    for name, tp in hints.items():
        args = typing.get_args(tp) or (tp,)
        if float in args:
            keys.append(prefix + name)
        for arg in args:
            if dataclasses.is_dataclass(arg):
                keys += _float_keys(arg, f"{prefix}{name}.")
    return keys


FLOAT_KEYS = _float_keys()


def test_float_keys_cover_the_settings():
    assert {"training.learning_rate", "training.max_grad_norm", "loss.w_kd", "loss.w_kd_end", "loss.temperature",
            "loss.jsd_beta", "loss.skew_alpha", "loss.on_policy_temperature"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf", "1e999", "1" + "0" * 400])
def test_non_finite_floats_are_refused(recipe, key, value):
    with pytest.raises(DistillError) as err:
        load_config(recipe, [f"{key}={value}"])
    assert str(err.value).startswith(f"config key '{key}' must be a finite number"), err.value


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_setting_has_a_range(recipe, key):
    with pytest.raises(DistillError, match=f"{key}[ ,]"):
        load_config(recipe, [f"{key}=-1"])


@pytest.mark.parametrize("override, message", [
    ("loss.jsd_beta=0", "loss.jsd_beta must be in (0, 1)"),
    ("loss.jsd_beta=1", "loss.jsd_beta must be in (0, 1)"),
    ("loss.skew_alpha=1", "loss.skew_alpha must be in [0, 1)"),
    ("training.seed=-1", "training.seed must be in [0, 4294966272)"),
    (f"training.seed={2**32 - 1024}", "(each rank seeds with seed + rank)"),
    ("training.early_stopping_patience=2", "training.early_stopping_patience counts evaluations without a better"),
])
def test_out_of_range_values(recipe, override, message):
    with pytest.raises(DistillError) as err:
        load_config(recipe, [override])
    assert message in str(err.value)


def test_largest_seed_is_accepted(recipe):
    assert load_config(recipe, [f"training.seed={2**32 - 1025}"]).training.seed == 2**32 - 1025


def test_a_key_in_the_wrong_section_points_to_its_own(recipe):
    with pytest.raises(DistillError, match=r"unknown config key 'training.temperature' \(did you mean "
                                           r"'loss.temperature'\?\)"):
        load_config(recipe, ["training.temperature=2"])


def test_every_config_error_is_reported_at_once(recipe):
    with pytest.raises(DistillError) as err:
        load_config(recipe, ["loss.w_kd=x", "trainig.max_steps=1", "eval.nope=1"])
    assert str(err.value).startswith("3 config errors: config key 'loss.w_kd' must be float, got 'x'; unknown config "
                                     "key 'trainig' (did you mean 'training'?); unknown config key 'eval.nope'"), err.value
    with pytest.raises(DistillError) as err:  # range checks of several sections
        load_config(recipe, ["training.learning_rate=-1", "loss.temperature=0"])
    assert str(err.value).startswith("2 config errors: training.learning_rate must be > 0"), err.value
    assert "; loss.temperature" in str(err.value) and "\n" not in str(err.value)
