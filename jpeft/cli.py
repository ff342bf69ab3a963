"""The ``jpeft`` command line: ``train | generate | merge | export-hf | import-hf | inspect``.

Each command is a thin layer over the library: :func:`jpeft.trainer.fit` trains,
:func:`jpeft.generate` decodes, :func:`jpeft.lora.merge` and
:func:`jpeft.models.to_hf_state_dict` write merged models, :mod:`jpeft.hf.peft_format`
converts adapters. Every option of ``jpeft train`` can also come from a YAML or JSON file
(``--config``), with command-line flags taking precedence.

Exit codes: 0 success; 1 training failed (a NaN or infinite loss); 2 bad input (a missing
file, a malformed dataset, checkpoint or config; the message says which), printed as
``jpeft: error: <message>`` without a traceback; 130 interrupted by Ctrl-C (``jpeft train``
saves a resumable train state first).

Example::

    jpeft train model.gguf --data train.jsonl --eval-split 0.1 --out out/run \\
        --rank 8 --alpha 16 --targets all-linear --lr 1e-3 --epochs 2
    jpeft generate model.gguf --adapter out/run/adapter --chat --prompt "Hi!"
    jpeft merge model.gguf --adapter out/run/adapter --out out/merged
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
_DTYPES = ("float32", "bfloat16")


class _UsageError(ValueError):
    """Bad input found by the command line itself (reported like every other bad input)."""


# ----------------------------------------------------------------------------- options of train


@dataclasses.dataclass(frozen=True)
class _Option:
    """One option of ``jpeft train``: its flags, default, parser and help.

    `kind` is ``"value"`` (takes an argument), ``"bool"`` (``--x``/``--no-x``) or
    ``"switch"`` (``--x`` only). Every option can also be a key of the ``--config`` file.
    """

    dest: str
    flags: tuple[str, ...]
    default: Any
    help: str
    group: str
    parse: Callable[[str], Any] | None = str
    choices: tuple[str, ...] | None = None
    kind: str = "value"
    metavar: str | None = None
    shown_default: str | None = None  # the default as --help describes it


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"expected an integer >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise ValueError(f"expected a fraction between 0 and 1, got {text}")
    return value


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "null", "off") else float(text)


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null", "off") else _positive_int(text)


def _targets(text: str | Sequence[str]) -> str | list[str]:
    """``q_proj,v_proj`` or ``q_proj`` (module names), ``all-linear``, or a regex."""
    if not isinstance(text, str):
        return [str(t) for t in text]
    text = text.strip()
    if text == "all-linear":
        return text
    if "," in text or re.fullmatch(r"[\w.]+", text):
        return [t.strip() for t in text.split(",") if t.strip()]
    return text  # a regex, matched against the whole module name (as HF PEFT does)


def _layers(text: str | int | Sequence[int]) -> list[int]:
    """``0,1,2``, ``0-3`` (inclusive) or a mix: ``0-3,8``."""
    if isinstance(text, int):
        return [text]
    if not isinstance(text, str):
        return [int(i) for i in text]
    layers: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        layers.extend(range(int(first), int(last) + 1) if last else [int(first)])
    return layers


def _train_options() -> list[_Option]:
    from jpeft import trainer

    d = {f.name: f.default for f in dataclasses.fields(trainer.TrainConfig)}
    o = _Option
    # fmt: off
    return [
        # data
        o("data", ("--data",), None, "training data: a .jsonl, .json, .csv or .parquet file of "
          "rows with 'text', 'prompt'/'completion' or chat 'messages' (or a Hub dataset name "
          "where the network allows); required", "data", metavar="FILE"),
        o("eval_data", ("--eval-data",), None, "held-out data in the same formats, for the "
          "eval loss", "data", metavar="FILE", shown_default="none"),
        o("eval_split", ("--eval-split",), None, "hold out this fraction of the training "
          "examples (shuffled with --seed) for the eval loss, instead of --eval-data", "data",
          parse=_fraction, metavar="FRACTION", shown_default="none"),
        o("max_length", ("--max-length",), 512, "longest example kept, in tokens (longer rows "
          "are bad rows)", "data", parse=_positive_int, metavar="TOKENS"),
        o("completion_only", ("--completion-only",), True, "train on completions and "
          "assistant turns only; --no-completion-only trains on every token", "data",
          parse=None, kind="bool"),
        o("on_bad_row", ("--on-bad-row",), "skip", "what to do with an unusable row (missing "
          "fields, empty text, too long): skip it (reported with its row number) or stop with "
          "an error", "data", choices=("skip", "error")),
        # method
        o("method", ("--method",), "lora", "the PEFT method", "method", choices=("lora",)),
        o("rank", ("--rank", "-r"), 8, "LoRA rank r", "method", parse=_positive_int,
          metavar="R"),
        o("alpha", ("--alpha",), None, "LoRA alpha (the update is scaled by alpha/r, or "
          "alpha/sqrt(r) with --rslora)", "method", parse=float,
          shown_default="same as --rank"),
        o("targets", ("--targets",), None, "modules to adapt: names separated by commas "
          "(q_proj,v_proj; suffix match), 'all-linear', or a regex matched against the whole "
          "module name (model\\.layers\\.\\d+\\.self_attn\\.q_proj)", "method", parse=_targets,
          metavar="NAMES|REGEX", shown_default="the model family's, q_proj,v_proj"),
        o("dropout", ("--dropout",), 0.0, "dropout probability on the LoRA input", "method",
          parse=float, metavar="P"),
        o("rslora", ("--rslora",), False, "rank-stabilised LoRA: scale by alpha/sqrt(r)",
          "method", parse=None, kind="bool"),
        o("layers", ("--layers",), None, "adapt only these layer indices: 0,1,2 or 0-3 or "
          "0-3,8", "method", parse=_layers, metavar="LIST", shown_default="all layers"),
        # optimisation
        o("lr", ("--lr",), d["learning_rate"], "peak learning rate of AdamW", "optimization",
          parse=float),
        o("weight_decay", ("--weight-decay",), d["weight_decay"], "AdamW weight decay",
          "optimization", parse=float, metavar="WD"),
        o("warmup_steps", ("--warmup-steps",), d["warmup_steps"], "steps of linear warm-up "
          "from 0 to --lr", "optimization", parse=_non_negative_int, metavar="N"),
        o("schedule", ("--schedule",), d["schedule"], "learning-rate decay after the warm-up",
          "optimization", choices=("cosine", "linear", "constant")),
        o("max_grad_norm", ("--max-grad-norm",), d["max_grad_norm"], "clip the global "
          "gradient norm to this; 'none' turns clipping off", "optimization",
          parse=_optional_float, metavar="NORM"),
        o("batch_size", ("--batch-size",), d["batch_size"], "examples per micro-batch",
          "optimization", parse=_positive_int, metavar="N"),
        o("grad_accum", ("--grad-accum",), d["grad_accum"], "micro-batches per optimizer step "
          "(gradient accumulation)", "optimization", parse=_positive_int, metavar="N"),
        o("max_steps", ("--max-steps",), d["max_steps"], "optimizer steps to take (overrides "
          "--epochs; needed with --pack)", "optimization", parse=_optional_int, metavar="N",
          shown_default="--epochs passes over the data"),
        o("epochs", ("--epochs",), d["epochs"], "passes over the training data",
          "optimization", parse=_positive_int, metavar="N"),
        o("bucket", ("--bucket",), d["bucket"], "pad lengths up to a multiple of this many "
          "tokens (bounds recompilation); with --pack, the packed row length", "optimization",
          parse=_positive_int, metavar="TOKENS"),
        o("pack", ("--pack",), d["pack"], "pack several short examples into each row "
          "(attention does not cross examples)", "optimization", parse=None, kind="bool"),
        o("eval_every", ("--eval-every",), d["eval_every"], "measure the eval loss every N "
          "steps (and at the end)", "optimization", parse=_positive_int, metavar="N"),
        o("save_every", ("--save-every",), d["save_every"], "save a resumable train state "
          "every N steps (and at the end, and on Ctrl-C)", "optimization",
          parse=_positive_int, metavar="N"),
        o("log_every", ("--log-every",), d["log_every"], "append a line to metrics.jsonl "
          "every N steps", "optimization", parse=_positive_int, metavar="N"),
        o("keep_checkpoints", ("--keep-checkpoints",), d["keep_checkpoints"], "newest train "
          "states kept in OUT/checkpoints", "optimization", parse=_positive_int, metavar="N"),
        o("seed", ("--seed",), d["seed"], "seed of the LoRA initialisation, the data order, "
          "dropout and --eval-split", "optimization", parse=int),
        # model and output
        o("dtype", ("--dtype",), "float32", "dtype of the frozen base weights (the adapter "
          "and optimizer state stay float32)", "model and output", choices=_DTYPES),
        o("quantize", ("--quantize",), "none", "QLoRA: store the frozen linear weights in 4 "
          "bits (bitsandbytes' NF4 or FP4 layout), quantised while the model loads; the "
          "adapter trains in --dtype on the dequantised weights", "model and output",
          choices=("none", "nf4", "fp4")),
        o("double_quant", ("--double-quant",), True, "with --quantize, store the block scales "
          "in 8 bits too (QLoRA's double quantisation)", "model and output", parse=None,
          kind="bool"),
        o("block_size", ("--block-size",), 64, "with --quantize, elements per quantisation "
          "block (32 to 4096, a power of two)", "model and output", parse=_positive_int,
          metavar="N"),
        o("out", ("--out",), None, "output folder: metrics.jsonl, loss.png, checkpoints/, "
          "adapter/ (jpeft) and hf_adapter/ (Hugging Face PEFT); required",
          "model and output", metavar="DIR"),
        o("resume", ("--resume",), False, "continue from the newest train state in "
          "OUT/checkpoints (same data order, same result as an uninterrupted run)",
          "model and output", parse=None, kind="switch"),
        o("base_model_name", ("--base-model-name",), None, "base_model_name_or_path written "
          "into hf_adapter/adapter_config.json (e.g. HuggingFaceTB/SmolLM2-135M-Instruct)",
          "model and output", metavar="NAME", shown_default="MODEL as given"),
        o("progress", ("--progress",), True, "show a progress bar with loss and tokens/s",
          "model and output", parse=None, kind="bool"),
        # distributed
        o("coordinator", ("--coordinator",), None, "host:port of process 0, for training on "
          "several hosts (jax.distributed); or JPEFT_COORDINATOR", "distributed",
          metavar="HOST:PORT", shown_default="single process"),
        o("num_processes", ("--num-processes",), None, "number of processes of a multi-host "
          "run; or JPEFT_NUM_PROCESSES", "distributed", parse=_positive_int, metavar="N",
          shown_default="single process"),
        o("process_id", ("--process-id",), None, "this process's index, 0 to N-1; or "
          "JPEFT_PROCESS_ID", "distributed", parse=_non_negative_int, metavar="I",
          shown_default="single process"),
    ]
    # fmt: on


_GROUP_TITLES = {
    "data": "data",
    "method": "method (LoRA)",
    "optimization": "optimizer and schedule",
    "model and output": "model and output",
    "distributed": "distributed (several hosts)",
}


def _help_text(option: _Option) -> str:
    shown = option.shown_default
    if shown is None:
        shown = option.default
        if option.kind == "bool":
            shown = f"--{option.flags[0][2:]}" if option.default else f"--no-{option.flags[0][2:]}"
        elif option.kind == "switch":
            shown = "off"
    text = option.help.replace("%", "%%")
    if "required" in option.help.rsplit(";", 1)[-1]:
        return text
    return f"{text} (default: {shown})"


def _add_train_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "train",
        help="fine-tune a model with LoRA on a dataset",
        description="Fine-tunes MODEL with LoRA on --data and writes to --out: metrics.jsonl "
        "(one line per step: loss, grad norm, tokens, tokens/s, eval loss), loss.png, "
        "checkpoints/ (resumable train states), adapter/ (the jpeft adapter, Orbax) and "
        "hf_adapter/ (the same adapter in Hugging Face PEFT format). Ctrl-C saves a train "
        "state and exits with code 130; continue with --resume. Every option can also be a "
        "key of the --config file (underscores or dashes, e.g. max_steps: 100); flags given "
        "on the command line override the file.",
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
    groups = {}
    for option in _train_options():
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(_GROUP_TITLES[option.group])
        group = groups[option.group]
        kwargs: dict[str, Any] = dict(
            dest=option.dest, default=argparse.SUPPRESS, help=_help_text(option)
        )
        if option.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif option.kind == "switch":
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = _argparse_type(option)
            kwargs["choices"] = option.choices
            kwargs["metavar"] = option.metavar
        group.add_argument(*option.flags, **kwargs)
    return parser


def _argparse_type(option: _Option) -> Callable[[str], Any]:
    parse = option.parse or str

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = option.metavar or option.dest  # argparse names it in its messages
    return convert


def _train_settings(namespace: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the --config file, then the command line."""
    options = {o.dest: o for o in _train_options()}
    settings: dict[str, Any] = {dest: o.default for dest, o in options.items()}
    settings["model"] = None
    given = vars(namespace)
    if given.get("config"):
        settings.update(_read_config_file(Path(given["config"]), options))
    settings.update({k: v for k, v in given.items() if k in settings})
    for name, flag in (("model", "MODEL"), ("data", "--data"), ("out", "--out")):
        if not settings[name]:
            raise _UsageError(
                f"train needs {flag} (on the command line or as {name!r} in the --config file)"
            )
    if settings["eval_data"] and settings["eval_split"]:
        raise _UsageError("give --eval-data or --eval-split, not both")
    return settings


def _read_config_file(path: Path, options: dict[str, _Option]) -> dict[str, Any]:
    """The options in a YAML or JSON file, checked and converted like command-line values."""
    if not path.is_file():
        raise _UsageError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as err:  # json and yaml raise their own error types
        raise _UsageError(f"config file {path} cannot be parsed: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _UsageError(f"config file {path} must hold a mapping of option names to values")
    known = {**options, "model": None}
    values, unknown = {}, []
    for key, value in raw.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            unknown.append(str(key))
            continue
        values[dest] = value if dest == "model" else _config_value(known[dest], value, path)
    if unknown:
        raise _UsageError(
            f"config file {path} has unknown keys: {', '.join(sorted(unknown))} (known keys: "
            f"{', '.join(sorted(known))})"
        )
    return values


def _config_value(option: _Option, value: Any, path: Path) -> Any:
    where = f"config file {path}: {option.dest}"
    if option.kind in ("bool", "switch"):
        if not isinstance(value, bool):
            raise _UsageError(f"{where} must be true or false, got {value!r}")
        return value
    if value is None:
        if option.default is None or option.dest in ("max_grad_norm", "max_steps"):
            return None
        raise _UsageError(f"{where} cannot be null")
    if option.choices is not None and value not in option.choices:
        raise _UsageError(f"{where} must be one of {', '.join(option.choices)}, got {value!r}")
    if option.parse in (_targets, _layers) and isinstance(value, (list, tuple, int)):
        return option.parse(value)
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise _UsageError(f"{where} has the wrong type: {value!r}")
    try:
        return (option.parse or str)(str(value))
    except (TypeError, ValueError) as err:
        raise _UsageError(f"{where}: {err}") from None


# ----------------------------------------------------------------------------- train


def _train(args: argparse.Namespace) -> int:
    import jax

    from jpeft import checkpoint, lora, trainer, tree
    from jpeft.hf import peft_format

    s = _train_settings(args)
    out = Path(s["out"])
    _initialize_distributed(s)
    state_dir = out / "checkpoints"
    if not s["resume"] and checkpoint.latest_step(state_dir) is not None:
        raise _UsageError(
            f"{out} holds the train state of an earlier run (step "
            f"{checkpoint.latest_step(state_dir)} in {state_dir}): pass --resume to continue "
            "it, or remove that folder or choose another --out to start again"
        )
    model_path = _existing(s["model"], "model")
    tokenizer = _load_tokenizer(model_path)
    examples, eval_examples = _training_data(s, tokenizer)

    if s["quantize"] == "none":
        model, base = _load_model(model_path, s["dtype"])[:2]
    else:
        model, base = _load_quantized(model_path, s)
    lora_config = lora.LoraConfig(
        r=s["rank"],
        lora_alpha=s["rank"] if s["alpha"] is None else s["alpha"],
        target_modules=s["targets"],
        lora_dropout=s["dropout"],
        use_rslora=s["rslora"],
        layers_to_transform=s["layers"],
    )
    params = lora.apply(base, config=lora_config, key=jax.random.key(s["seed"]))
    tree.print_trainable_parameters(params)
    config = trainer.TrainConfig(
        learning_rate=s["lr"],
        weight_decay=s["weight_decay"],
        warmup_steps=s["warmup_steps"],
        schedule=s["schedule"],
        max_grad_norm=s["max_grad_norm"],
        batch_size=s["batch_size"],
        grad_accum=s["grad_accum"],
        max_steps=s["max_steps"],
        epochs=s["epochs"],
        bucket=s["bucket"],
        pack=s["pack"],
        eval_every=s["eval_every"],
        save_every=s["save_every"],
        log_every=s["log_every"],
        keep_checkpoints=s["keep_checkpoints"],
        seed=s["seed"],
    )
    if s["resume"]:
        at = checkpoint.latest_step(state_dir)
        print(
            f"resuming from step {at} in {state_dir}"
            if at is not None
            else f"no train state in {state_dir}: starting from step 0",
            flush=True,
        )
    base_name = s["base_model_name"] or str(s["model"])
    adapter_config = {
        "peft_type": "LORA",
        "base_model_name_or_path": base_name,
        **_jsonable(dataclasses.asdict(lora_config)),
    }
    try:
        params = trainer.fit(
            model,
            params,
            examples,
            out,
            config=config,
            eval_examples=eval_examples,
            pad_id=_pad_id(tokenizer),
            resume=s["resume"],
            adapter_config=adapter_config,
            progress=s["progress"],
        )
    except KeyboardInterrupt:
        at = checkpoint.latest_step(state_dir)
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
    if jax.process_index() == 0:
        peft_format.export_peft(params, out / "hf_adapter", base_model_name_or_path=base_name)
    _print_train_summary(out)
    return EXIT_OK


def _initialize_distributed(s: dict[str, Any]) -> None:
    flags = {k: s[k] for k in ("coordinator", "num_processes", "process_id")}
    if all(v is None for v in flags.values()):
        return
    try:
        from jpeft import parallel
    except ImportError as err:
        raise _UsageError(
            f"--coordinator/--num-processes/--process-id need jpeft.parallel, which this "
            f"installation lacks ({err})"
        ) from None
    parallel.initialize_distributed(
        s["coordinator"], num_processes=s["num_processes"], process_id=s["process_id"]
    )


def _training_data(s: dict[str, Any], tokenizer: Any) -> tuple[list, list]:
    """Tokenised training and eval examples; bad rows are printed with their row numbers."""
    examples = _tokenized(s["data"], "training data", s, tokenizer)
    eval_examples: list = []
    if s["eval_data"]:
        eval_examples = _tokenized(s["eval_data"], "eval data", s, tokenizer)
    elif s["eval_split"]:
        order = np.random.default_rng(s["seed"]).permutation(len(examples))
        held = max(1, round(s["eval_split"] * len(examples)))
        if held >= len(examples):
            raise _UsageError(
                f"--eval-split {s['eval_split']} leaves no training examples out of {len(examples)}"
            )
        eval_examples = [examples[i] for i in sorted(order[:held])]
        examples = [examples[i] for i in sorted(order[held:])]
        print(
            f"eval split: {len(eval_examples)} of the examples held out, "
            f"{len(examples)} left for training",
            flush=True,
        )
    return examples, eval_examples


def _tokenized(source: str, what: str, s: dict[str, Any], tokenizer: Any) -> list:
    import datasets

    from jpeft import data

    if Path(source).suffix and not Path(source).exists():  # not a Hub name: a missing file
        raise _UsageError(f"{source} does not exist")
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
            max_length=s["max_length"],
            completion_only=s["completion_only"],
            on_bad_row=s["on_bad_row"],
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
        raise _UsageError(f"{source} has no usable example")
    return examples


def _print_train_summary(out: Path) -> None:
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


# ----------------------------------------------------------------------------- shared helpers


def _existing(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise _UsageError(f"{what} {path} does not exist")
    return path


def _load_model(path: Path, dtype: str = "float32") -> tuple[Any, dict, dict]:
    """``(model, params, HF config dict)`` of a model folder or GGUF file, read once."""
    import jax.numpy as jnp

    from jpeft import models
    from jpeft.hf import checkpoints

    path = _existing(path, "model")
    if path.is_file() and path.suffix == ".gguf":
        from jpeft.hf import gguf

        config, tensors = gguf.read_gguf(path)
    elif path.is_dir():
        config, tensors = checkpoints.read_folder(path)
    else:
        raise _UsageError(f"{path} is neither a model folder nor a .gguf file")
    model = models.from_config(config)
    params = model.from_hf_state_dict(tensors, dtype=jnp.dtype(dtype), source=str(path))
    return model, params, config


def _load_quantized(path: Path, s: dict[str, Any]) -> tuple[Any, dict]:
    """``(model, params)`` with every linear weight but the head in 4 bits (``--quantize``),
    quantised as it loads; the adapter's compute dtype is ``--dtype``."""
    import jax.numpy as jnp

    from jpeft import qlora, targets
    from jpeft.quant import nf4

    try:
        nf4.check_options(s["block_size"], s["quantize"])
    except ValueError as err:
        raise _UsageError(f"--block-size/--quantize: {err}") from None
    dtype = jnp.dtype(s["dtype"])
    model, params = qlora.from_pretrained(
        path,
        dtype=dtype,
        block_size=s["block_size"],
        double_quant=s["double_quant"],
        quant_type=s["quantize"],
        compute_dtype=dtype,
    )
    count = sum(  # per layer, as HF names them
        len(m.names) for m in targets.modules(params) if isinstance(m.weight, nf4.NF4Weight)
    )
    double = " with double quantisation" if s["double_quant"] else ""
    print(
        f"quantised {count} linear weights to {s['quantize']} (block size "
        f"{s['block_size']}{double})",
        flush=True,
    )
    return model, params


def _load_tokenizer(path: Path, required: bool = True) -> Any:
    from jpeft import models

    try:
        return models.load_tokenizer(path)
    except Exception as err:  # transformers raises many types for a folder without one
        if not required:
            return None
        raise _UsageError(f"cannot load a tokenizer from {path}: {err}") from None


def _adapter_kind(path: Path) -> tuple[str, Path]:
    """``("hf" | "jpeft", folder)`` of an adapter folder (or of a ``jpeft train`` output)."""
    from jpeft import checkpoint
    from jpeft.hf import peft_format

    path = _existing(path, "adapter")
    if (path / peft_format.CONFIG_FILE).is_file():
        return "hf", path
    if (path / checkpoint.METADATA_FILE).is_file():
        return "jpeft", path
    if (path / "adapter" / checkpoint.METADATA_FILE).is_file():
        return "jpeft", path / "adapter"
    raise _UsageError(
        f"{path} is neither a jpeft adapter ({checkpoint.METADATA_FILE}) nor a Hugging Face "
        f"PEFT adapter ({peft_format.CONFIG_FILE})"
    )


def _with_adapter(base: dict, adapter: str | os.PathLike) -> dict:
    from jpeft import checkpoint
    from jpeft.hf import peft_format

    kind, folder = _adapter_kind(Path(adapter))
    if kind == "hf":
        return peft_format.import_peft(base, folder)
    return checkpoint.load_adapter(base, folder)


# ----------------------------------------------------------------------------- generate


def _generate(args: argparse.Namespace) -> int:
    import jpeft

    model_path = _existing(args.model, "model")
    tokenizer = _load_tokenizer(model_path)
    model, params, _ = _load_model(model_path, args.dtype)
    if args.adapter:
        params = _with_adapter(params, args.adapter)
    prompts: list[Any] = list(args.prompt)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [system + [{"role": "user", "content": p}] for p in prompts]
    elif args.system:
        raise _UsageError("--system needs --chat")
    answers = jpeft.generate(
        model,
        params,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    for i, (prompt, answer) in enumerate(zip(args.prompt, answers, strict=True)):
        if len(answers) > 1:
            print(f"--- prompt {i + 1}: {prompt}")
        print(answer)
    return EXIT_OK


# ----------------------------------------------------------------------------- merge


def _merge(args: argparse.Namespace) -> int:
    import safetensors.numpy

    from jpeft import lora, models

    model_path = _existing(args.model, "model")
    model, base, config = _load_model(model_path, args.dtype)
    params = _with_adapter(base, args.adapter)
    state = models.to_hf_state_dict(model, lora.merge(params))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in config.items() if k != "torch_dtype"}
    config["dtype"] = args.dtype
    if not config.get("architectures"):
        raise _UsageError(
            f"the config of {model_path} names no 'architectures'; transformers "
            "could not load the merged folder"
        )
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    safetensors.numpy.save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = _load_tokenizer(model_path, required=False)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    print(
        f"merged {sum(v.size for v in state.values()):,d} parameters ({len(state)} tensors, "
        f"{args.dtype}) into {out}"
    )
    if tokenizer is None:
        print(
            f"warning: {model_path} has no tokenizer that transformers can load; none was written",
            file=sys.stderr,
        )
    return EXIT_OK


# ----------------------------------------------------------------------------- export / import


def _export_hf(args: argparse.Namespace) -> int:
    from jpeft import checkpoint
    from jpeft.hf import peft_format

    kind, folder = _adapter_kind(Path(args.adapter))
    if kind != "jpeft":
        raise _UsageError(f"{folder} is already a Hugging Face PEFT adapter")
    _, base, _ = _load_model(_existing(args.model, "model"))
    params = checkpoint.load_adapter(base, folder)
    name = args.base_model_name
    if name is None:
        stored = checkpoint.read_adapter_metadata(folder).get("config") or {}
        name = stored.get("base_model_name_or_path") or str(args.model)
    written = peft_format.export_peft(params, args.out, base_model_name_or_path=name)
    print(f"wrote {written / peft_format.CONFIG_FILE} and {written / peft_format.WEIGHTS_FILE}")
    return EXIT_OK


def _import_hf(args: argparse.Namespace) -> int:
    from jpeft import checkpoint
    from jpeft.hf import peft_format

    kind, folder = _adapter_kind(Path(args.adapter))
    if kind != "hf":
        raise _UsageError(
            f"{folder} is not a Hugging Face PEFT adapter (it has no {peft_format.CONFIG_FILE})"
        )
    _, base, _ = _load_model(_existing(args.model, "model"))
    params = peft_format.import_peft(base, folder)
    config = {**peft_format.read_config(folder), "imported_from": str(folder)}
    checkpoint.save_adapter(params, args.out, config=config)
    print(f"wrote the jpeft adapter {args.out}")
    return EXIT_OK


# ----------------------------------------------------------------------------- inspect


def _inspect(args: argparse.Namespace) -> int:
    info = inspect_path(Path(args.path))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(_render(info))
    return EXIT_OK


def inspect_path(path: Path) -> dict[str, Any]:
    """What `path` holds, as a JSON-ready dict with ``type`` and kind-specific fields.

    Recognises a jpeft adapter folder, a Hugging Face PEFT adapter folder, a folder of
    train states, a ``jpeft train`` output folder, a Hugging Face model folder, a
    ``.safetensors`` file and a ``.gguf`` file.

    Raises:
      _UsageError: `path` is missing or none of these.
    """
    from jpeft import checkpoint
    from jpeft.hf import peft_format

    path = _existing(path, "path")
    if path.is_file() and path.suffix == ".gguf":
        return _inspect_gguf(path)
    if path.is_file() and path.suffix == ".safetensors":
        tensors = _safetensors_shapes(path)
        return {"type": "safetensors file", "path": str(path), **_tensor_summary(tensors)}
    if not path.is_dir():
        raise _UsageError(
            f"cannot tell what {path} holds (expected an adapter, model or "
            "train-state folder, or a .gguf or .safetensors file)"
        )
    if (path / peft_format.CONFIG_FILE).is_file():
        return _inspect_hf_adapter(path)
    if (path / checkpoint.METADATA_FILE).is_file():
        return _inspect_adapter(path)
    if (path / "config.json").is_file():
        return _inspect_model(path)
    if _step_folders(path):
        return _inspect_train_state(path)
    parts = {name: path / name for name in ("adapter", "hf_adapter", "checkpoints")}
    if any(p.exists() for p in parts.values()) or (path / "metrics.jsonl").is_file():
        return _inspect_run(path, parts)
    raise _UsageError(
        f"cannot tell what {path} holds (expected an adapter, model or "
        "train-state folder, or a .gguf or .safetensors file)"
    )


def _inspect_adapter(path: Path) -> dict[str, Any]:
    from jpeft import checkpoint

    metadata = checkpoint.read_adapter_metadata(path)
    entries, total = [], 0
    for entry in metadata["entries"]:
        arrays = entry["arrays"]
        size = sum(int(np.prod(spec["shape"])) for name, spec in arrays.items() if name != "scale")
        layers = entry["static"].get("layers")
        if entry["type"] == "lora" and layers is not None:  # only these layers are adapted
            size = size * len(layers) // arrays["a"]["shape"][0]
        if entry["type"] == "lora":
            rank = arrays["a"]["shape"][-1]
            detail = {"rank": rank, **entry["static"]}
        else:
            detail = dict(entry["static"])
        entries.append(
            {
                "path": ".".join(map(str, entry["path"])),
                "kind": entry["type"],
                "arrays": {
                    k: {"shape": v["shape"], "dtype": v["dtype"]} for k, v in arrays.items()
                },
                "parameters": size,
                **detail,
            }
        )
        total += size
    return {
        "type": "jpeft adapter",
        "path": str(path),
        "format_version": metadata["format_version"],
        "parameters": total,
        "config": metadata["config"],
        "entries": entries,
    }


def _inspect_hf_adapter(path: Path) -> dict[str, Any]:
    from jpeft.hf import peft_format

    config = peft_format.read_config(path)
    weights = path / peft_format.WEIGHTS_FILE
    summary = _tensor_summary(_safetensors_shapes(weights)) if weights.is_file() else {}
    keep = (
        "peft_type",
        "base_model_name_or_path",
        "r",
        "lora_alpha",
        "target_modules",
        "lora_dropout",
        "use_rslora",
        "layers_to_transform",
        "rank_pattern",
        "alpha_pattern",
        "bias",
        "modules_to_save",
        "task_type",
        "use_dora",
    )
    return {
        "type": "Hugging Face PEFT adapter",
        "path": str(path),
        "config": {k: config[k] for k in keep if k in config},
        **summary,
    }


def _inspect_model(path: Path) -> dict[str, Any]:
    from jpeft.hf import checkpoints

    config = checkpoints.read_config(path)
    tensors: dict[str, tuple[list[int], str]] = {}
    for file in checkpoints.safetensors_files(path):
        tensors.update(_safetensors_shapes(file))
    tokenizer = [
        n
        for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
        if (path / n).is_file()
    ]
    return {
        "type": "Hugging Face model folder",
        "path": str(path),
        "config": config,
        "tokenizer": tokenizer or None,
        **_tensor_summary(tensors),
    }


def _step_folders(path: Path) -> list[int]:
    return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())


def _inspect_train_state(path: Path) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    steps = _step_folders(path)
    latest = steps[-1]
    handlers = {"arrays": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(create=False)
    try:
        with ocp.CheckpointManager(
            path.absolute(), options=options, item_handlers=handlers
        ) as manager:
            arrays = manager.item_metadata(latest)["arrays"]
            meta = manager.restore(
                latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            ).meta
    except Exception as err:  # Orbax raises many kinds on a damaged folder
        raise _UsageError(
            f"{path / str(latest)} cannot be read as a jpeft train state: {err}"
        ) from None
    import jax

    tensors = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(arrays)[0]:
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)
        tensors[name] = (list(leaf.shape), str(np.dtype(leaf.dtype)))
    params = {k: v for k, v in tensors.items() if k.startswith("params.")}
    return {
        "type": "jpeft train state",
        "path": str(path),
        "steps": steps,
        "latest_step": latest,
        "data_position": meta.get("data_position"),
        "trainable_parameters": sum(int(np.prod(s)) for s, _ in params.values()),
        "optimizer_state_values": sum(
            int(np.prod(s)) for k, (s, _) in tensors.items() if k.startswith("opt_state.")
        ),
        **{
            k: v
            for k, v in _tensor_summary(tensors, group_layers=False).items()
            if k != "parameters"
        },  # optimizer moments are not parameters
    }


def _inspect_run(path: Path, parts: dict[str, Path]) -> dict[str, Any]:
    info: dict[str, Any] = {"type": "jpeft train output", "path": str(path)}
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        info["steps_logged"] = len(records)
        info["last_metrics"] = records[-1] if records else None
        evals = [r for r in records if "eval_loss" in r]
        if evals:
            info["last_eval"] = {"step": evals[-1]["step"], "eval_loss": evals[-1]["eval_loss"]}
    for name, part in parts.items():
        if part.is_dir():
            try:
                inner = inspect_path(part)
            except ValueError as err:
                inner = {"error": str(err)}
            info[name] = {k: v for k, v in inner.items() if k not in ("tensors", "entries")}
    info["files"] = sorted(p.name for p in path.iterdir())
    return info


def _inspect_gguf(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as err:  # the reader raises many kinds on a damaged file
        raise _UsageError(f"{path} cannot be read as GGUF: {err}") from None
    metadata = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        if field.types and field.types[0].name == "ARRAY" and len(field.data) > 8:
            metadata[name] = f"[array of {len(field.data)}]"
            continue
        value = field.contents()
        if isinstance(value, str) and len(value) > 80:
            value = value[:77] + "..."
        metadata[name] = value
    tensors, types = {}, {}
    for t in reader.tensors:
        shape = [int(n) for n in reversed(t.shape.tolist())]
        tensors[t.name] = (shape, t.tensor_type.name)
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {
        "type": "GGUF file",
        "path": str(path),
        "architecture": metadata.get("general.architecture"),
        "tensor_types": types,
        "metadata": metadata,
        **_tensor_summary(tensors, layer_pattern=r"blk\.\d+\."),
    }


def _safetensors_shapes(path: Path) -> dict[str, tuple[list[int], str]]:
    """Names, shapes and dtypes from a safetensors header, without reading the data."""
    import struct

    try:
        with open(path, "rb") as file:
            (size,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(size))
    except (OSError, struct.error, ValueError) as err:
        raise _UsageError(f"{path} is not a readable safetensors file: {err}") from None
    return {
        name: (spec["shape"], spec["dtype"])
        for name, spec in header.items()
        if name != "__metadata__"
    }


def _tensor_summary(
    tensors: dict[str, tuple[list[int], str]],
    *,
    group_layers: bool = True,
    layer_pattern: str = r"(?<=\.)(?:layers|h)\.\d+\.",
) -> dict[str, Any]:
    """Parameter count and the tensors, with the layers of a stack shown once as ``*``."""
    total = sum(int(np.prod(shape)) for shape, _ in tensors.values())
    grouped: dict[str, dict[str, Any]] = {}
    for name, (shape, dtype) in tensors.items():
        key = name
        if group_layers:
            key = re.sub(layer_pattern, lambda m: re.sub(r"\d+", "*", m.group(0)), name)
        entry = grouped.setdefault(key, {"shape": shape, "dtype": dtype, "count": 0})
        entry["count"] += 1
        if entry["shape"] != shape:
            entry["shape"] = "varies"
    return {"parameters": total, "tensor_count": len(tensors), "tensors": grouped}


def _render(info: dict[str, Any], indent: str = "") -> str:
    lines = []
    for key, value in info.items():
        if key == "tensors":
            grouped = any(t["count"] > 1 for t in value.values())
            lines.append(f"{indent}tensors ({len(value)}{' kinds' if grouped else ''}):")
            width = max((len(k) for k in value), default=0)
            for name, t in value.items():
                times = f"  x{t['count']}" if t["count"] > 1 else ""
                shape = t["shape"] if isinstance(t["shape"], str) else list(t["shape"])
                lines.append(f"{indent}  {name:<{width}}  {shape} {t['dtype']}{times}")
        elif key == "entries":
            lines.append(f"{indent}entries ({len(value)}):")
            for entry in value:
                arrays = ", ".join(
                    f"{k} {v['shape']} {v['dtype']}" for k, v in entry["arrays"].items()
                )
                extra = {
                    k: v
                    for k, v in entry.items()
                    if k not in ("path", "kind", "arrays", "parameters")
                }
                lines.append(
                    f"{indent}  {entry['path']}  {entry['kind']}  {arrays}  "
                    f"parameters {entry['parameters']:,d}  {json.dumps(extra)}"
                )
        elif isinstance(value, dict) and key in ("adapter", "hf_adapter", "checkpoints"):
            lines.append(f"{indent}{key}:")
            lines.append(_render(value, indent + "  "))
        elif isinstance(value, dict) and key in ("config", "metadata"):
            lines.append(f"{indent}{key}:")
            for k, v in value.items():
                lines.append(f"{indent}  {k}: {json.dumps(v, default=str)}")
        elif (
            isinstance(value, int)
            and not isinstance(value, bool)
            and key.endswith(("parameters", "_values", "_count"))
        ):
            lines.append(f"{indent}{key}: {value:,d}")
        else:
            lines.append(
                f"{indent}{key}: "
                f"{value if isinstance(value, str) else json.dumps(value, default=str)}"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The ``jpeft`` argument parser with all its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="jpeft",
        description="Parameter-efficient fine-tuning in JAX: train a LoRA adapter, generate "
        "with it, merge it, convert it to and from Hugging Face PEFT, inspect checkpoints. "
        "Run 'jpeft COMMAND --help' for the options of a command.",
        epilog="exit codes: 0 success, 1 training failed (NaN loss), 2 bad input, 130 interrupted",
    )
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="show the full traceback of an error instead of one line (default: off)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train_parser(commands)

    def model_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "model",
            metavar="MODEL",
            help="the base model: a Hugging Face model folder or a .gguf file",
        )

    def dtype_arg(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument(
            "--dtype", choices=_DTYPES, default="float32", help=f"{what} (default: float32)"
        )

    gen = commands.add_parser(
        "generate",
        help="generate text with a model, with or without an adapter",
        description="Generates a completion for each --prompt with MODEL, optionally with an "
        "adapter, and prints it (one block per prompt when there are several).",
        epilog="example: jpeft generate model.gguf --adapter out/run/adapter --chat "
        "--prompt 'Extract the person as JSON: ...'",
    )
    model_arg(gen)
    gen.add_argument(
        "--adapter",
        metavar="DIR",
        help="an adapter folder: a jpeft adapter "
        "(jpeft_adapter.json), a Hugging Face PEFT adapter (adapter_config.json) "
        "or a 'jpeft train' output folder (default: none, the base model)",
    )
    gen.add_argument(
        "--prompt",
        metavar="TEXT",
        nargs="+",
        action="extend",
        required=True,
        help="one or more prompts (the flag may be repeated); required",
    )
    gen.add_argument(
        "--chat",
        action="store_true",
        help="send each prompt as a user message "
        "through the tokenizer's chat template (default: off, raw text)",
    )
    gen.add_argument("--system", metavar="TEXT", help="a system message for --chat (default: none)")
    gen.add_argument(
        "--max-new-tokens",
        type=_argparse_type(
            _Option("max_new_tokens", (), 64, "", "", parse=_positive_int, metavar="N")
        ),
        default=64,
        metavar="N",
        help="most tokens generated per prompt (default: 64)",
    )
    gen.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 decodes greedily (default: 0.0)",
    )
    gen.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus sampling: sample among "
        "the most likely tokens holding this much probability (default: 1.0)",
    )
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    dtype_arg(gen, "dtype of the base weights")

    merge = commands.add_parser(
        "merge",
        help="fold an adapter into the base and write a Hugging Face model folder",
        description="Folds the adapter into MODEL's weights (W + scale * A @ B) and writes a "
        "Hugging Face model folder (config.json, model.safetensors and the tokenizer) that "
        "transformers.AutoModelForCausalLM.from_pretrained loads; from a .gguf file the "
        "weights are dequantised.",
        epilog="example: jpeft merge model.gguf --adapter out/run/adapter --out out/merged",
    )
    model_arg(merge)
    merge.add_argument(
        "--adapter",
        metavar="DIR",
        required=True,
        help="a jpeft or Hugging "
        "Face PEFT adapter folder, or a 'jpeft train' output folder; required",
    )
    merge.add_argument("--out", metavar="DIR", required=True, help="the folder to write; required")
    dtype_arg(merge, "dtype of the merged weights written")

    export = commands.add_parser(
        "export-hf",
        help="convert a jpeft adapter to a Hugging Face PEFT adapter",
        description="Writes a jpeft adapter as a Hugging Face PEFT adapter folder "
        "(adapter_config.json + adapter_model.safetensors) that peft.PeftModel.from_pretrained, "
        "transformers and vLLM load. MODEL is the base the adapter was trained on.",
        epilog="example: jpeft export-hf model.gguf --adapter out/run/adapter --out out/hf",
    )
    model_arg(export)
    export.add_argument(
        "--adapter",
        metavar="DIR",
        required=True,
        help="the jpeft adapter folder (or a 'jpeft train' output folder); required",
    )
    export.add_argument("--out", metavar="DIR", required=True, help="the folder to write; required")
    export.add_argument(
        "--base-model-name",
        metavar="NAME",
        help="base_model_name_or_path "
        "written into adapter_config.json (default: the one recorded at "
        "training, else MODEL as given)",
    )

    imp = commands.add_parser(
        "import-hf",
        help="convert a Hugging Face PEFT adapter to a jpeft adapter",
        description="Reads a Hugging Face PEFT LoRA adapter folder onto MODEL and saves it as "
        "a jpeft adapter folder (Orbax), e.g. to continue training it in jpeft.",
        epilog="example: jpeft import-hf model.gguf --adapter peft_adapter/ --out out/adapter",
    )
    model_arg(imp)
    imp.add_argument(
        "--adapter",
        metavar="HF_DIR",
        required=True,
        help="the Hugging Face PEFT "
        "adapter folder (adapter_config.json + adapter_model.safetensors); "
        "required",
    )
    imp.add_argument(
        "--out", metavar="DIR", required=True, help="the jpeft adapter folder to write; required"
    )

    ins = commands.add_parser(
        "inspect",
        help="show what a checkpoint, adapter or model holds",
        description="Shows what PATH holds: its type, entries or tensors with shapes and "
        "dtypes (the layers of a stack shown once as *), parameter counts and config. PATH "
        "may be a jpeft adapter folder, a Hugging Face PEFT adapter folder, a train-state "
        "folder (OUT/checkpoints), a 'jpeft train' output folder, a Hugging Face model folder, "
        "a .safetensors file or a .gguf file. Reads headers and metadata only.",
        epilog="example: jpeft inspect out/run/adapter",
    )
    ins.add_argument("path", metavar="PATH", help="the folder or file to inspect")
    ins.add_argument(
        "--json", action="store_true", help="print JSON instead of text (default: off)"
    )
    return parser


_COMMANDS = {
    "train": _train,
    "generate": _generate,
    "merge": _merge,
    "export-hf": _export_hf,
    "import-hf": _import_hf,
    "inspect": _inspect,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``jpeft`` with `argv` (default: ``sys.argv[1:]``) and returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse has printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_BAD_INPUT
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("jpeft: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as err:  # CheckpointError and DataError are ValueErrors
        if args.traceback:
            raise
        print(f"jpeft: error: {_message(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _message(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError) and err.filename:
        return f"{err.filename} does not exist"
    return str(err) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
