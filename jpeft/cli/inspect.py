"""``jpeft inspect``: what a checkpoint, adapter, model file or training run holds.

Every fact comes from the library's own readers (adapter metadata, Orbax train-state
metadata, safetensors headers, GGUF metadata); this module only recognises the kind of path
and lays the facts out as text or JSON.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from jpeft.cli.common import EXIT_OK, UsageError, existing

_HF_ADAPTER_KEYS = (
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
    "num_virtual_tokens",
)
_UNKNOWN = (
    "cannot tell what {} holds (expected an adapter, model or train-state folder, or a .gguf "
    "or .safetensors file)"
)


def add_parser(commands: Any) -> None:
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


def run(args: argparse.Namespace) -> int:
    info = inspect_path(Path(args.path))
    print(json.dumps(info, indent=2, default=str) if args.json else render(info))
    return EXIT_OK


def inspect_path(path: Path) -> dict[str, Any]:
    """What `path` holds, as a JSON-ready dict with ``type`` and kind-specific fields.

    Raises:
      UsageError: `path` is missing or of no kind jpeft knows.
    """
    from jpeft import checkpoint, train_state
    from jpeft.hf import checkpoints, peft_format

    path = existing(path, "path")
    if path.is_file() and path.suffix == ".gguf":
        return _gguf(path)
    if path.is_file() and path.suffix == ".safetensors":
        tensors = checkpoints.read_safetensors_header(path)
        return {"type": "safetensors file", "path": str(path), **_tensor_summary(tensors)}
    if not path.is_dir():
        raise UsageError(_UNKNOWN.format(path))
    if (path / peft_format.CONFIG_FILE).is_file():
        return _hf_adapter(path)
    if (path / checkpoint.METADATA_FILE).is_file():
        return _adapter(path)
    if (path / "config.json").is_file():
        return _model(path)
    if train_state.latest_step(path) is not None:
        return _train_state(path)
    parts = {name: path / name for name in ("adapter", "hf_adapter", "checkpoints")}
    if any(p.exists() for p in parts.values()) or (path / "metrics.jsonl").is_file():
        return _run(path, parts)
    raise UsageError(_UNKNOWN.format(path))


def _adapter(path: Path) -> dict[str, Any]:
    from jpeft import checkpoint

    description = checkpoint.describe_adapter(path)
    return {"type": "jpeft adapter", "path": str(path), **description}


def _hf_adapter(path: Path) -> dict[str, Any]:
    from jpeft.hf import checkpoints, peft_format

    config = peft_format.read_config(path)
    weights = path / peft_format.WEIGHTS_FILE
    summary = (
        _tensor_summary(checkpoints.read_safetensors_header(weights)) if weights.is_file() else {}
    )
    return {
        "type": "Hugging Face PEFT adapter",
        "path": str(path),
        "config": {k: config[k] for k in _HF_ADAPTER_KEYS if k in config},
        **summary,
    }


def _model(path: Path) -> dict[str, Any]:
    from jpeft.hf import checkpoints

    tensors: dict[str, tuple[list[int], str]] = {}
    for file in checkpoints.safetensors_files(path):
        tensors.update(checkpoints.read_safetensors_header(file))
    tokenizer = [
        n
        for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
        if (path / n).is_file()
    ]
    return {
        "type": "Hugging Face model folder",
        "path": str(path),
        "config": checkpoints.read_config(path),
        "tokenizer": tokenizer or None,
        **_tensor_summary(tensors),
    }


def _train_state(path: Path) -> dict[str, Any]:
    from jpeft import train_state

    state = train_state.describe(path)
    tensors = state["arrays"]
    params = [s for k, (s, _) in tensors.items() if k.startswith("params.")]
    moments = [s for k, (s, _) in tensors.items() if k.startswith("opt_state.")]
    summary = _tensor_summary(tensors, group_layers=False)
    del summary["parameters"]  # optimizer moments are not parameters
    return {
        "type": "jpeft train state",
        "path": str(path),
        "steps": state["steps"],
        "latest_step": state["latest_step"],
        "data_position": state["data_position"],
        "trainable_parameters": sum(int(np.prod(s)) for s in params),
        "optimizer_state_values": sum(int(np.prod(s)) for s in moments),
        **summary,
    }


def _run(path: Path, parts: dict[str, Path]) -> dict[str, Any]:
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


def _gguf(path: Path) -> dict[str, Any]:
    from jpeft.hf import gguf

    metadata, tensors = gguf.read_metadata(path)
    shown = {}
    for name, value in metadata.items():
        if isinstance(value, list) and len(value) > 8:
            value = f"[array of {len(value)}]"
        elif isinstance(value, str) and len(value) > 80:
            value = value[:77] + "..."
        shown[name] = value
    types: dict[str, int] = {}
    for _, kind in tensors.values():
        types[kind] = types.get(kind, 0) + 1
    return {
        "type": "GGUF file",
        "path": str(path),
        "architecture": metadata.get("general.architecture"),
        "tensor_types": types,
        "metadata": shown,
        **_tensor_summary(tensors, layer_pattern=r"blk\.\d+\."),
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
        entry = grouped.setdefault(key, {"shape": list(shape), "dtype": dtype, "count": 0})
        entry["count"] += 1
        if entry["shape"] != list(shape):
            entry["shape"] = "varies"
    return {"parameters": total, "tensor_count": len(tensors), "tensors": grouped}


def render(info: dict[str, Any], indent: str = "") -> str:
    """`info` from :func:`inspect_path` as indented text."""
    lines = []
    for key, value in info.items():
        if key == "tensors":
            grouped = any(t["count"] > 1 for t in value.values())
            lines.append(f"{indent}tensors ({len(value)}{' kinds' if grouped else ''}):")
            width = max((len(k) for k in value), default=0)
            for name, t in value.items():
                times = f"  x{t['count']}" if t["count"] > 1 else ""
                lines.append(f"{indent}  {name:<{width}}  {t['shape']} {t['dtype']}{times}")
        elif key == "entries":
            lines.append(f"{indent}entries ({len(value)}):")
            for entry in value:
                arrays = ", ".join(
                    f"{k} {v['shape']} {v['dtype']}" for k, v in entry["arrays"].items()
                )
                lines.append(
                    f"{indent}  {entry['path']}  {entry['kind']}  {arrays}  "
                    f"parameters {entry['parameters']:,d}  {json.dumps(entry['static'])}"
                )
        elif isinstance(value, dict) and key in ("adapter", "hf_adapter", "checkpoints"):
            lines.append(f"{indent}{key}:")
            lines.append(render(value, indent + "  "))
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
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            lines.append(f"{indent}{key}: {text}")
    return "\n".join(lines)
