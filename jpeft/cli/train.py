"""``jpeft train``: fine-tune a model with a registered PEFT method on a dataset.

Its options come from dataclasses: the data, output and distributed options below, the
method's config (:mod:`jpeft.methods`) and :class:`jpeft.trainer.TrainConfig`; each can also
be a key of the ``--config`` file (see :mod:`jpeft.cli.options`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jpeft.cli import options
from jpeft.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    UsageError,
    existing,
    load_model,
    load_tokenizer,
)
from jpeft.cli.train_options import DataOptions, DistributedOptions, OutputOptions

DEFAULT_METHOD = "lora"
_FILE_ONLY_KEYS = ("model", "method")  # config-file keys that are not flags


def _groups(method_name: str) -> list[tuple[str, type]]:
    from jpeft import methods, trainer

    method = methods.get(method_name)
    return [
        ("data", DataOptions),
        (f"method ({method.title})", method.config_class),
        ("optimizer and schedule", trainer.TrainConfig),
        ("model and output", OutputOptions),
        ("distributed (several hosts)", DistributedOptions),
    ]


def _all_options(method_name: str) -> list[options.Option]:
    return [o for _, cls in _groups(method_name) for o in options.options_of(cls)]


def requested_method(argv: Sequence[str]) -> str:
    """The method a ``jpeft train`` command line asks for (``--method``, else the
    ``--config`` file's ``method``, else LoRA), so that its options can be added."""
    if not argv or argv[0] != "train":
        return DEFAULT_METHOD
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method")
    pre.add_argument("--config")
    given = pre.parse_known_args(argv[1:])[0]
    if given.method:
        return given.method
    if given.config and Path(given.config).is_file():
        try:
            return str(options.read_mapping(Path(given.config)).get("method", DEFAULT_METHOD))
        except UsageError:
            return DEFAULT_METHOD  # reported when the file is read in full
    return DEFAULT_METHOD


def add_parser(commands: Any, method_name: str) -> None:
    """Adds ``train`` with the options of `method_name` to the sub-command parsers."""
    from jpeft import methods

    parser = commands.add_parser(
        "train",
        help="fine-tune a model with a PEFT method (LoRA by default) on a dataset",
        description="Fine-tunes MODEL with a PEFT method on --data and writes to --out: "
        "metrics.jsonl (one line per step: loss, grad norm, tokens, tokens/s, eval loss), "
        "loss.png, checkpoints/ (resumable train states), adapter/ (the jpeft adapter, "
        "Orbax) and hf_adapter/ (the same adapter in Hugging Face PEFT format). Ctrl-C saves "
        "a train state and exits with code 130; continue with --resume. Every option can "
        "also be a key of the --config file (underscores or dashes, e.g. max_steps: 100, or "
        "TRL SFTConfig names such as learning_rate or per_device_train_batch_size); flags "
        "given on the command line override the file. 'jpeft train --method NAME --help' "
        "shows the options of method NAME.",
        epilog="example: jpeft train model.gguf --data train.jsonl --eval-split 0.1 --out "
        "out/run --rank 8 --alpha 16 --targets all-linear --lr 1e-3 --epochs 2",
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=argparse.SUPPRESS,
        metavar="MODEL",
        help="a Hugging Face model folder (config.json, *.safetensors and the tokenizer) or "
        "a .gguf file; required (here or as 'model' in the --config file)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="a YAML or JSON file of options (keys are the option names: lr, max_steps, "
        "targets, model, data, out, ...; paths are relative to the current folder); unknown "
        "keys are an error (default: none)",
    )
    parser.add_argument(
        "--method",
        choices=methods.names(),
        default=argparse.SUPPRESS,
        help=f"the PEFT method (default: {DEFAULT_METHOD})",
    )
    for title, cls in _groups(method_name):
        options.add_group(parser, title, options.options_of(cls))
    parser.set_defaults(method=method_name)  # the method whose options were added


def settings_of(namespace: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the --config file, then the command line, checked."""
    given = vars(namespace)
    method_name = given["method"]
    known = _all_options(method_name)
    settings: dict[str, Any] = {o.dest: o.default for o in known}
    settings.update(model=None, method=method_name)
    if given.get("config"):
        from_file = options.read_config_file(Path(given["config"]), known, _FILE_ONLY_KEYS)
        if from_file.get("method", method_name) != method_name:
            raise UsageError(
                f"--method {method_name} and the config file's method "
                f"{from_file['method']!r} disagree"
            )
        settings.update(from_file)
    settings.update({k: v for k, v in given.items() if k in settings})
    for name, flag in (("model", "MODEL"), ("data", "--data"), ("out", "--out")):
        if not settings[name]:
            raise UsageError(
                f"train needs {flag} (on the command line or as {name!r} in the --config file)"
            )
    if settings["eval_data"] and settings["eval_split"]:
        raise UsageError("give --eval-data or --eval-split, not both")
    return settings


def run(args: argparse.Namespace) -> int:
    import jax

    from jpeft import methods, train_state, trainer, tree
    from jpeft.hf import peft_format

    s = settings_of(args)
    method = methods.get(s["method"])
    data_options = options.build(DataOptions, s)
    output = options.build(OutputOptions, s)
    train_config = options.build(trainer.TrainConfig, s)
    method_config = options.build(method.config_class, s)
    out = Path(output.out)
    _initialize_distributed(options.build(DistributedOptions, s))
    state_dir = out / "checkpoints"
    if not output.resume and train_state.latest_step(state_dir) is not None:
        raise UsageError(
            f"{out} holds the train state of an earlier run (step "
            f"{train_state.latest_step(state_dir)} in {state_dir}): pass --resume to continue "
            "it, or remove that folder or choose another --out to start again"
        )
    model_path = existing(s["model"], "model")
    tokenizer = load_tokenizer(model_path)
    examples, eval_examples = _training_data(data_options, train_config.seed, tokenizer)
    if output.quantize == "none":
        model, base = load_model(model_path, output.dtype)
    else:
        model, base = _load_quantized(model_path, output)
    model = _with_model_options(model, output)
    params = method.apply(
        base, config=method_config, key=jax.random.key(train_config.seed), model=model
    )
    tree.print_trainable_parameters(params)
    if output.resume:
        at = train_state.latest_step(state_dir)
        print(
            f"resuming from step {at} in {state_dir}"
            if at is not None
            else f"no train state in {state_dir}: starting from step 0",
            flush=True,
        )
    base_name = output.base_model_name or str(s["model"])
    try:
        params = trainer.fit(
            model,
            params,
            examples,
            out,
            config=train_config,
            eval_examples=eval_examples,
            pad_id=_pad_id(tokenizer),
            resume=output.resume,
            adapter_config=method.adapter_config(method_config, base_model_name_or_path=base_name),
            progress=output.progress,
        )
    except KeyboardInterrupt:
        at = train_state.latest_step(state_dir)
        saved = (
            f"the train state is saved at step {at} in {state_dir}"
            if at is not None
            else "no train state was saved"
        )
        print(
            f"jpeft: interrupted: {saved}; run the same command with --resume to continue",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except trainer.NonFiniteLossError as err:
        print(f"jpeft: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    if jax.process_index() == 0 and method.peft_type is not None:
        peft_format.export_peft(params, out / "hf_adapter", base_model_name_or_path=base_name)
    _print_summary(out)
    return EXIT_OK


def _initialize_distributed(flags: DistributedOptions) -> None:
    values = dataclasses.asdict(flags)
    if all(v is None for v in values.values()):
        return
    from jpeft import distributed

    distributed.initialize_distributed(
        flags.coordinator, num_processes=flags.num_processes, process_id=flags.process_id
    )


def _with_model_options(model: Any, output: OutputOptions) -> Any:
    """`model` with ``--remat`` and ``--activations``; a usage error for an unknown policy."""
    try:
        return dataclasses.replace(model, remat=output.remat, activation_dtype=output.activations)
    except ValueError as err:
        raise UsageError(f"--remat: {err}") from None


def _load_quantized(path: Path, output: OutputOptions) -> tuple[Any, dict]:
    """``(model, params)`` with every linear weight but the head in 4 bits (``--quantize``),
    quantised as it loads; the adapter's compute dtype is ``--dtype``."""
    import jax.numpy as jnp

    from jpeft import qlora, targets
    from jpeft.quant import nf4

    try:
        nf4.check_options(output.block_size, output.quantize)
    except ValueError as err:
        raise UsageError(f"--block-size/--quantize: {err}") from None
    dtype = jnp.dtype(output.dtype)
    model, params = qlora.from_pretrained(
        path,
        dtype=dtype,
        block_size=output.block_size,
        double_quant=output.double_quant,
        quant_type=output.quantize,
        compute_dtype=dtype,
    )
    count = sum(  # per layer, as HF names them
        len(m.names) for m in targets.modules(params) if isinstance(m.weight, nf4.NF4Weight)
    )
    double = " with double quantisation" if output.double_quant else ""
    print(
        f"quantised {count} linear weights to {output.quantize} (block size "
        f"{output.block_size}{double})",
        flush=True,
    )
    return model, params


def _training_data(d: DataOptions, seed: int, tokenizer: Any) -> tuple[list, list]:
    """Tokenised training and eval examples; bad rows are printed with their row numbers."""
    examples = _tokenized(d.data, "training data", d, tokenizer)
    eval_examples: list = []
    if d.eval_data:
        eval_examples = _tokenized(d.eval_data, "eval data", d, tokenizer)
    elif d.eval_split:
        order = np.random.default_rng(seed).permutation(len(examples))
        held = max(1, round(d.eval_split * len(examples)))
        if held >= len(examples):
            raise UsageError(
                f"--eval-split {d.eval_split} leaves no training examples out of {len(examples)}"
            )
        eval_examples = [examples[i] for i in sorted(order[:held])]
        examples = [examples[i] for i in sorted(order[held:])]
        print(
            f"eval split: {len(eval_examples)} of the examples held out, "
            f"{len(examples)} left for training",
            flush=True,
        )
    return examples, eval_examples


def _tokenized(source: str, what: str, d: DataOptions, tokenizer: Any) -> list:
    import datasets

    from jpeft import data

    if Path(source).suffix and not Path(source).exists():  # not a Hub name: a missing file
        raise UsageError(f"{source} does not exist")
    quiet = datasets.is_progress_bar_enabled()
    if quiet:  # its "Generating train split" bars would bury the report below
        datasets.disable_progress_bars()
    try:
        rows = data.load_rows(source)
    finally:
        if quiet:
            datasets.enable_progress_bars()
    logger = logging.getLogger("jpeft.data")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the bad rows are printed below, once
    try:
        examples, problems = data.tokenize(
            rows,
            tokenizer,
            max_length=d.max_length,
            completion_only=d.completion_only,
            on_bad_row=d.on_bad_row,
        )
    finally:
        logger.setLevel(level)
    skipped = f", {len(problems)} bad row{'s' if len(problems) > 1 else ''} skipped:"
    print(
        f"{what}: {len(examples)} examples from {len(rows)} rows of {source}"
        + (skipped if problems else ""),
        flush=True,
    )
    for problem in problems[:20]:
        print(f"  {problem}")
    if len(problems) > 20:
        print(f"  ... and {len(problems) - 20} more")
    if not examples:
        raise UsageError(f"{source} has no usable example")
    return examples


def _print_summary(out: Path) -> None:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if records:
        last = records[-1]
        evals = [r["eval_loss"] for r in records if "eval_loss" in r]
        text = f"done: step {last['step']}, train loss {last['loss']:.4f}"
        if evals:
            text += f", eval loss {evals[-1]:.4f}"
        print(text)
    for label, name in (
        ("adapter (jpeft, Orbax)", "adapter"),
        ("adapter (Hugging Face PEFT)", "hf_adapter"),
        ("metrics", "metrics.jsonl"),
        ("loss plot", "loss.png"),
        ("train states", "checkpoints"),
    ):
        if (out / name).exists():
            print(f"  {label + ':':<29}{out / name}")


def _pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0
