"""``jpeft train``'s options come from the config dataclasses; a ``--config`` file may use
jpeft's option names or TRL ``SFTConfig``'s, and flags override it. No training runs here."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import pytest

from jpeft import cli, lora, trainer
from jpeft.cli import options, train
from jpeft.cli.train_options import DataOptions, OutputOptions


def _settings(*argv):
    argv = ["train", *map(str, argv)]
    args = cli.build_parser(train.requested_method(argv)).parse_args(argv)
    return train.settings_of(args)


def _error(*argv) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["train", *map(str, argv)]) == cli.EXIT_BAD_INPUT
    text = err.getvalue()
    assert text.startswith("jpeft: error: ") and len(text.strip().splitlines()) == 1, text
    return text


def test_every_config_field_with_help_is_a_flag_of_its_group():
    for cls in (trainer.TrainConfig, lora.LoraConfig, DataOptions, OutputOptions):
        derived = {o.field for o in options.options_of(cls)}
        documented = {f.name for f in dataclasses.fields(cls) if "help" in f.metadata}
        assert derived == documented and derived, cls
    assert {f.name for f in dataclasses.fields(trainer.TrainConfig)} == {
        o.field for o in options.options_of(trainer.TrainConfig)
    }  # every optimiser setting can be set from the command line


def test_flags_build_the_method_and_trainer_configs():
    s = _settings(
        "m", "--data", "d.jsonl", "--out", "o", "-r", "4", "--targets", "q_proj,o_proj",
        "--layers", "0-2,5", "--rslora", "--lr", "3e-3", "--max-grad-norm", "none",
        "--schedule", "linear", "--no-progress",
    )  # fmt: skip
    config = options.build(lora.LoraConfig, s)
    assert config == lora.LoraConfig(
        r=4,
        lora_alpha=4,  # --alpha defaults to the rank
        target_modules=("q_proj", "o_proj"),
        layers_to_transform=(0, 1, 2, 5),
        use_rslora=True,
    )
    assert options.build(trainer.TrainConfig, s) == trainer.TrainConfig(
        learning_rate=3e-3, max_grad_norm=None, schedule="linear"
    )
    assert options.build(OutputOptions, s).progress is False
    regex = _settings("m", "--data", "d", "--out", "o", "--targets", r"model\.layers\.0\..*")
    assert options.build(lora.LoraConfig, regex).target_modules == r"model\.layers\.0\..*"


def test_a_trl_sft_config_file_maps_onto_jpeft_options(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text(
        "model: base\n"
        "learning_rate: 5.0e-5\nper_device_train_batch_size: 2\ngradient_accumulation_steps: 4\n"
        "num_train_epochs: 3\nwarmup_steps: 7\nlr_scheduler_type: constant_with_warmup\n"
        "weight_decay: 0.01\nmax_grad_norm: 0.5\nlogging_steps: 5\nsave_steps: 20\n"
        "save_total_limit: 3\neval_steps: 10\noutput_dir: runs/sft\nmax_seq_length: 256\n"
        "packing: true\nseed: 42\nbf16: true\ndata: d.jsonl\nmax_steps: 30\n"
        "optim: adamw_bnb_8bit\n"
    )
    s = _settings("--config", path, "--seed", "7")  # the flag overrides the file
    assert options.build(trainer.TrainConfig, s) == trainer.TrainConfig(
        learning_rate=5e-5,
        batch_size=2,
        grad_accum=4,
        epochs=3,
        warmup_steps=7,
        schedule="constant",
        weight_decay=0.01,
        max_grad_norm=0.5,
        log_every=5,
        save_every=20,
        keep_checkpoints=3,
        eval_every=10,
        max_steps=30,
        pack=True,
        seed=7,
        optim="adamw_8bit",
    )
    output = options.build(OutputOptions, s)
    assert output.out == "runs/sft" and output.dtype == "bfloat16"
    assert options.build(DataOptions, s).max_length == 256 and s["model"] == "base"


def test_trl_constant_schedule_has_no_warmup_and_others_are_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr_scheduler_type": "constant", "data": "d", "out": "o"}))
    s = _settings("m", "--config", path)
    assert s["schedule"] == "constant" and s["warmup_steps"] == 0
    path.write_text(json.dumps({"lr_scheduler_type": "polynomial"}))
    assert "lr_scheduler_type 'polynomial' is not implemented" in _error("m", "--config", path)


def test_trl_optimizer_names_map_to_adamw_or_its_8bit_form_and_others_are_named(tmp_path):
    path = tmp_path / "c.json"
    for name, ours in [
        ("adamw_torch", "adamw"),
        ("adamw_torch_fused", "adamw"),
        ("adamw_bnb_8bit", "adamw_8bit"),
        ("adamw_8bit", "adamw_8bit"),
    ]:
        path.write_text(json.dumps({"optim": name, "data": "d", "out": "o"}))
        assert _settings("m", "--config", path)["optim"] == ours, name
    path.write_text(json.dumps({"optim": "adafactor"}))
    assert "optim 'adafactor' is not implemented; jpeft has adamw_torch" in _error(
        "m", "--config", path
    )
    assert _settings("m", "--data", "d", "--out", "o", "--optim", "adamw_8bit")["optim"] == (
        "adamw_8bit"
    )


def test_unimplemented_trl_keys_and_unknown_keys_are_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"gradient_checkpointing": True, "tf32": True, "lr_typo": 1}))
    text = _error("m", "--data", "d", "--out", "o", "--config", path)
    assert "unknown keys: lr_typo" in text
    assert "TRL SFTConfig keys jpeft does not implement: gradient_checkpointing, tf32" in text


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--batch-size", "0"], "batch_size must be at least 1, got 0"),
        (["--rank", "0"], "r must be a positive integer, got 0"),
        (["--eval-split", "1.5"], "expected a fraction between 0 and 1"),
        (["--max-steps", "x"], "argument --max-steps: invalid literal for int()"),
        (["--method", "ia4"], "unknown PEFT method 'ia4'"),
    ],
)
def test_bad_values_are_usage_errors(argv, expected, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi"}\n')
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["train", str(tmp_path), "--data", str(data), "--out", "o", *argv])
    assert code == cli.EXIT_BAD_INPUT and expected in err.getvalue(), err.getvalue()
