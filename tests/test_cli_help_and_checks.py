"""What the command line tells a new user: check-config refuses input paths that are not there (all of them,
in one line), and each sub-command's help shows the defaults."""

import pytest

from distill.cli import build_parser, main


def test_check_config_refuses_missing_input_paths(capsys, tmp_path):
    code = main(["check-config", "--config", "recipes/demo/kd.yaml", f"student.path={tmp_path}/nope",
                 f"data.path={tmp_path}/data.jsonl", f"training.output_dir={tmp_path}/run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("distill: error: ") and f"student.path not found: {tmp_path}/nope" in err[0]
    assert f"data.path not found: {tmp_path}/data.jsonl" in err[0]


def test_check_config_takes_paths_that_exist_and_hub_ids(capsys, demo_assets, tmp_path):
    teacher = demo_assets["teacher"]
    assert main(["check-config", "--config", "recipes/demo/kd.yaml", f"student.path={teacher}",
                 f"teacher.path={teacher}", f"data.path={demo_assets['data']}", "training.output_dir=/nonexistent/run"
                 ]) == 0
    assert main(["check-config", "--config", "recipes/demo/kd.yaml", "student.path=facebook/bart-base",
                 "teacher.path=facebook/bart-large", f"data.path={demo_assets['data']}"]) == 0


@pytest.mark.parametrize("command, shown", [
    ("generate", "--batch-size BATCH_SIZE\n                        default: 16"),
    ("train", "--launcher {deepspeed,torchrun}\n                        default: deepspeed"),
])
def test_sub_command_help_shows_defaults(command, shown, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    assert shown in capsys.readouterr().out
