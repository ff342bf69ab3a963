"""Every ``jpeft`` command's help describes every flag, and bad input of each kind ends in
one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cli_fixtures import run, tiny  # noqa: F401  (tiny is a fixture)

from jpeft import cli

def test_help_of_every_command_describes_every_flag(capsys):
    parser = cli.build_parser()
    (commands,) = parser._subparsers._group_actions  # the sub-command action
    assert set(commands.choices) == {
        "train",
        "generate",
        "merge",
        "export-hf",
        "import-hf",
        "inspect",
        "bench",
    }
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    for name, sub in commands.choices.items():
        assert name in top
        assert cli.main([name, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, (name, flag)
            if action.help and action.dest != "help":
                words = " ".join(action.help.split())
                assert "default" in words or "required" in words or not action.option_strings, (
                    name,
                    action.dest,
                )
    code = subprocess.run(
        [sys.executable, "-m", "jpeft", "train", "--help"], capture_output=True, text=True
    ).returncode
    assert code == 0


@pytest.mark.parametrize(
    "case",
    [
        "missing model",
        "missing data",
        "unknown config key",
        "not an adapter",
        "targets match nothing",
        "missing path",
        "eval twice",
        "no model",
        "unknown remat",
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, tiny, tmp_path):
    model, data = tiny["model"], tiny["data"]
    out = tmp_path / "out"
    argv, expected = {
        "missing model": (
            ["train", tmp_path / "nope", "--data", data, "--out", out],
            "does not exist",
        ),
        "missing data": (
            ["train", model, "--data", tmp_path / "nope.jsonl", "--out", out],
            "nope.jsonl does not exist",
        ),
        "unknown config key": (
            ["train", "--config", _bad_config(tmp_path, tiny), "--out", out],
            "unknown keys: learning_rat, optimiser",
        ),
        "not an adapter": (
            ["generate", model, "--adapter", tmp_path, "--prompt", "hi"],
            "neither a jpeft adapter",
        ),
        "targets match nothing": (
            ["train", model, "--data", data, "--out", out, "--targets", "qq_proj"],
            "qq_proj",
        ),
        "missing path": (["inspect", tmp_path / "nothing"], "nothing does not exist"),
        "eval twice": (
            [
                "train",
                model,
                "--data",
                data,
                "--out",
                out,
                "--eval-data",
                data,
                "--eval-split",
                "0.1",
            ],
            "not both",
        ),
        "no model": (["train", "--data", data, "--out", out], "train needs MODEL"),
        "unknown remat": (
            ["train", model, "--data", data, "--out", out, "--remat", "save_all"],
            "--remat: unknown remat policy 'save_all'",
        ),
    }[case]
    code, stdout, stderr = run(*argv)
    assert code == 2
    assert stderr.startswith("jpeft: error: ") and expected in stderr, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1


def _bad_config(tmp_path, tiny):
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            {
                "model": str(tiny["model"]),
                "data": str(tiny["data"]),
                "learning_rat": 1e-3,
                "optimiser": "adam",
                "rank": 4,
            }
        )
    )
    return path
