"""Command-line options derived from config dataclasses, and the ``--config`` file.

An option is a dataclass field with ``metadata["help"]``; its type comes from the field's
annotation (``int``, ``float``, ``str``, ``bool``, and ``X | None``), its default from the
field, and the rest from the metadata:

* ``flag``: the long flag (default ``--field-name``), ``short``: a short alias;
* ``choices``, ``metavar``, ``shown_default`` (the default as ``--help`` describes it);
* ``parse``: ``parse(text_or_value) -> value`` for formats beyond the annotation's type;
* ``default_from``: another field of the same class whose value this one takes when it is
  not given (LoRA's alpha is the rank unless set).

The same options are the keys of a ``--config`` YAML or JSON file (the flag's name with
dashes or underscores, or the field's name), and so are the names of TRL's ``SFTConfig``
where jpeft has the feature (:data:`TRL_ALIASES`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from jpeft.cli.common import UsageError

_NONE_WORDS = ("none", "null", "off")

# TRL SFTConfig (and transformers TrainingArguments) names of jpeft train options.
TRL_ALIASES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "save_total_limit": "keep_checkpoints",
    "eval_steps": "eval_every",
    "output_dir": "out",
    "max_seq_length": "max_length",
    "packing": "pack",
    "completion_only_loss": "completion_only",
}
# TRL's learning-rate schedules jpeft has: TRL's "constant" has no warm-up at all.
TRL_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant_with_warmup": "constant"}
# TRL's (transformers') optimizer names jpeft has, and its own.
TRL_OPTIMIZERS = {
    "adamw_torch": "adamw",
    "adamw_torch_fused": "adamw",
    "adamw_bnb_8bit": "adamw_8bit",
    "adamw_8bit": "adamw_8bit",
    "adamw": "adamw",
}
# SFTConfig / TrainingArguments keys jpeft does not implement: named as such when they occur.
TRL_UNSUPPORTED = frozenset(
    "adam_beta1 adam_beta2 adam_epsilon assistant_only_loss auto_find_batch_size "
    "chat_template_path dataloader_num_workers dataset_kwargs dataset_num_proc "
    "dataset_text_field deepspeed do_eval do_train eos_token eval_accumulation_steps "
    "eval_strategy evaluation_strategy fp16 fsdp gradient_checkpointing group_by_length "
    "hub_model_id label_smoothing_factor logging_dir logging_strategy lr_scheduler_kwargs "
    "max_grad_norm_type model_init_kwargs neftune_noise_alpha overwrite_output_dir "
    "pad_token padding_free per_device_eval_batch_size push_to_hub report_to "
    "resume_from_checkpoint run_name save_strategy tf32 torch_compile use_liger_kernel "
    "warmup_ratio".split()
)


@dataclasses.dataclass(frozen=True)
class Option:
    """One command-line option, derived from field `field` of the dataclass `owner`."""

    owner: type
    field: str
    dest: str
    flags: tuple[str, ...]
    default: Any
    kind: str  # "value" (takes an argument) or "bool" (--x / --no-x)
    parse: Callable[[Any], Any]
    optional: bool  # None is a valid value
    choices: tuple[str, ...] | None
    help: str
    metavar: str | None
    shown_default: str | None
    default_from: str | None


def options_of(cls: type) -> list[Option]:
    """The options of a config dataclass: its fields with ``metadata["help"]``."""
    hints = typing.get_type_hints(cls)
    options = []
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if "help" not in meta:
            continue
        base, optional = _base_type(hints[field.name])
        flag = meta.get("flag", "--" + field.name.replace("_", "-"))
        default = field.default
        if default is dataclasses.MISSING:
            default = field.default_factory()  # type: ignore[misc]
        if meta.get("default_from"):
            default = None
        options.append(
            Option(
                owner=cls,
                field=field.name,
                dest=flag[2:].replace("-", "_"),
                flags=(flag, *((meta["short"],) if "short" in meta else ())),
                default=default,
                kind="bool" if base is bool else "value",
                parse=meta.get("parse") or _scalar_parser(base),
                optional=optional,
                choices=tuple(meta["choices"]) if "choices" in meta else None,
                help=meta["help"],
                metavar=meta.get("metavar"),
                shown_default=meta.get("shown_default"),
                default_from=meta.get("default_from"),
            )
        )
    return options


def add_group(parser: argparse.ArgumentParser, title: str, options: Iterable[Option]) -> None:
    """Adds `options` to `parser` as one titled group of ``--help``. Defaults are left out
    of the namespace (``argparse.SUPPRESS``), so that only given flags override a file."""
    group = parser.add_argument_group(title)
    for option in options:
        kwargs: dict[str, Any] = {
            "dest": option.dest,
            "default": argparse.SUPPRESS,
            "help": help_text(option),
        }
        if option.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(
                type=argparse_type(option.parse, option.optional, option.metavar or option.dest),
                choices=option.choices,
                metavar=option.metavar,
            )
        group.add_argument(*option.flags, **kwargs)


def help_text(option: Option) -> str:
    """The help of `option` with its default, as ``--help`` shows it."""
    text = option.help.replace("%", "%%")
    if "required" in option.help.rsplit(";", 1)[-1]:
        return text
    shown = option.shown_default
    if shown is None:
        name = option.flags[0][2:]
        if option.kind == "bool":
            shown = f"--{name}" if option.default else f"--no-{name}"
        else:
            shown = "none" if option.default is None else option.default
    return f"{text} (default: {shown})"


def argparse_type(parse: Callable[[Any], Any], optional: bool, name: str) -> Callable[[str], Any]:
    """`parse` as an argparse ``type=``: None for ``none``/``null``/``off`` where allowed,
    and errors argparse reports as usage errors naming the option."""

    def convert(text: str) -> Any:
        if optional and text.lower() in _NONE_WORDS:
            return None
        try:
            return parse(text)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = name  # argparse names it in its messages
    return convert


def build(cls: type, settings: dict[str, Any], **fixed: Any) -> Any:
    """An instance of `cls` from the settings of its options (and `fixed` fields).

    Raises:
      UsageError: the dataclass refuses the values (its message names the field).
    """
    values = dict(fixed)
    for option in options_of(cls):
        value = settings[option.dest]
        if value is None and option.default_from is not None:
            source = next(o for o in options_of(cls) if o.field == option.default_from)
            value = settings[source.dest]
        values[option.field] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None


def read_config_file(path: Path, options: Sequence[Option], extra: Sequence[str]) -> dict:
    """The settings in a YAML or JSON file, checked and converted like command-line values.

    Keys are option names (dashes or underscores), field names, TRL ``SFTConfig`` names
    (:data:`TRL_ALIASES`, ``max_length``, ``bf16``, ``lr_scheduler_type``, ``optim``) or one of
    `extra` (taken as they are, e.g. ``model``). Returns settings keyed by option ``dest``.

    Raises:
      UsageError: a missing or unparsable file, unknown or unimplemented keys (all named),
        a value of the wrong type.
    """
    raw = read_mapping(path)
    by_name: dict[str, Option] = {}
    for option in options:
        by_name[option.dest] = by_name[option.field] = option
    values: dict[str, Any] = {}
    unknown, unsupported = [], []
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        name = TRL_ALIASES.get(name, name) if name not in by_name else name
        if name in extra:
            values[name] = value
        elif name in ("bf16", "lr_scheduler_type", "optim"):
            values.update(_trl_setting(name, value, path))
        elif name in by_name:
            option = by_name[name]
            values[option.dest] = config_value(option, value, path)
        elif name in TRL_UNSUPPORTED:
            unsupported.append(str(key))
        else:
            unknown.append(str(key))
    problems = []
    if unknown:
        known = sorted({o.dest for o in options} | set(extra))
        problems.append(
            f"unknown keys: {', '.join(sorted(unknown))} (known keys: {', '.join(known)})"
        )
    if unsupported:
        problems.append(
            f"TRL SFTConfig keys jpeft does not implement: {', '.join(sorted(unsupported))}"
        )
    if problems:
        raise UsageError(f"config file {path} has " + "; and ".join(problems))
    return values


def config_value(option: Option, value: Any, path: Path) -> Any:
    """A value from the config file for `option`, converted as its flag would be."""
    where = f"config file {path}: {option.dest}"
    if option.kind == "bool":
        if not isinstance(value, bool):
            raise UsageError(f"{where} must be true or false, got {value!r}")
        return value
    if value is None:
        if option.optional or option.default is None:
            return None
        raise UsageError(f"{where} cannot be null")
    if option.choices is not None and value not in option.choices:
        raise UsageError(f"{where} must be one of {', '.join(option.choices)}, got {value!r}")
    try:
        if isinstance(value, (list, tuple)) or (
            isinstance(value, int) and not isinstance(value, bool)
        ):
            return option.parse(value)
        if isinstance(value, (bool, dict)):
            raise ValueError(f"has the wrong type: {value!r}")
        return option.parse(str(value))
    except (TypeError, ValueError) as err:
        raise UsageError(f"{where}: {err}") from None


def _trl_setting(name: str, value: Any, path: Path) -> dict[str, Any]:
    """jpeft settings for TRL's ``bf16``, ``lr_scheduler_type`` and ``optim``."""
    where = f"config file {path}: {name}"
    if name == "optim":
        if value not in TRL_OPTIMIZERS:
            raise UsageError(
                f"{where} {value!r} is not implemented; jpeft has {', '.join(TRL_OPTIMIZERS)}"
            )
        return {"optim": TRL_OPTIMIZERS[value]}
    if name == "bf16":
        if not isinstance(value, bool):
            raise UsageError(f"{where} must be true or false, got {value!r}")
        return {"dtype": "bfloat16"} if value else {}
    if value == "constant":
        return {"schedule": "constant", "warmup_steps": 0}
    if value not in TRL_SCHEDULES:
        raise UsageError(
            f"{where} {value!r} is not implemented; jpeft has "
            f"{', '.join(['constant', *TRL_SCHEDULES])}"
        )
    return {"schedule": TRL_SCHEDULES[value]}


def read_mapping(path: Path) -> dict:
    """The mapping a YAML or JSON config file holds, unchecked."""
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as err:  # json and yaml raise their own error types
        raise UsageError(f"config file {path} cannot be parsed: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(f"config file {path} must hold a mapping of option names to values")
    return raw


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """``(type, optional)`` of an annotation such as ``int | None``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        return (args[0] if len(args) == 1 else str), optional
    return annotation, False


def _scalar_parser(kind: Any) -> Callable[[Any], Any]:
    if kind in (int, float):
        return kind
    return str
