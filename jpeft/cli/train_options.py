"""The options of ``jpeft train`` that are not the method's or the optimiser's: the data,
the model and output, and the processes of a multi-host run. Each field with
``metadata["help"]`` is a flag and a ``--config`` key (see :mod:`jpeft.cli.options`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jpeft.cli.common import DTYPES


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise ValueError(f"expected a fraction between 0 and 1, got {text}")
    return value


def _unset(text: str, **cli: Any) -> Any:
    """An option whose default is None (unset), with its help and command-line metadata."""
    return dataclasses.field(default=None, metadata={"help": text, **cli})


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataOptions:
    data: str | None = _unset(
        "training data: a .jsonl, .json, .csv or .parquet file of rows with 'text', "
        "'prompt'/'completion' or chat 'messages' (or a Hub dataset name where the network "
        "allows); required",
        metavar="FILE",
    )
    eval_data: str | None = _unset(
        "held-out data in the same formats, for the eval loss", metavar="FILE"
    )
    eval_split: float | None = _unset(
        "hold out this fraction of the training examples (shuffled with --seed) for the eval "
        "loss, instead of --eval-data",
        parse=_fraction,
        metavar="FRACTION",
    )
    max_length: int = dataclasses.field(
        default=512,
        metadata={
            "help": "longest example kept, in tokens (longer rows are bad rows)",
            "metavar": "TOKENS",
        },
    )
    completion_only: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "train on completions and assistant turns only; --no-completion-only "
            "trains on every token"
        },
    )
    on_bad_row: str = dataclasses.field(
        default="skip",
        metadata={
            "help": "what to do with an unusable row (missing fields, empty text, too long): "
            "skip it (reported with its row number) or stop with an error",
            "choices": ("skip", "error"),
        },
    )

    def __post_init__(self):
        if self.max_length < 1:
            raise ValueError(f"--max-length must be at least 1, got {self.max_length}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutputOptions:
    dtype: str = dataclasses.field(
        default="float32",
        metadata={
            "help": "dtype of the frozen base weights (the adapter and optimizer state stay "
            "float32)",
            "choices": DTYPES,
        },
    )
    activations: str | None = _unset(
        "dtype of the activations between the products (the residual stream, norms, "
        "attention): float32 over a bfloat16 --dtype keeps them in float32 while each product "
        "still reads bfloat16 operands (faster on CPUs with bfloat16 dot instructions, with "
        "--remat save_matmuls most of all, for twice the activation memory)",
        choices=DTYPES,
        shown_default="--dtype",
    )
    remat: str = dataclasses.field(
        default="nothing_saveable",
        metadata={
            "help": "what each layer keeps for the backward pass: nothing_saveable (its "
            "input only), save_mlp, save_matmuls (also the named activations: faster, more "
            "memory), none (everything), or another jax.checkpoint_policies name",
            "metavar": "POLICY",
        },
    )
    quantize: str = dataclasses.field(
        default="none",
        metadata={
            "help": "QLoRA: store the frozen linear weights in 4 bits (bitsandbytes' NF4 or "
            "FP4 layout), quantised while the model loads; the adapter trains in --dtype on "
            "the dequantised weights",
            "choices": ("none", "nf4", "fp4"),
        },
    )
    double_quant: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "with --quantize, store the block scales in 8 bits too (QLoRA's double "
            "quantisation)"
        },
    )
    block_size: int = dataclasses.field(
        default=64,
        metadata={
            "help": "with --quantize, elements per quantisation block (32 to 4096, a power of two)",
            "metavar": "N",
        },
    )
    out: str | None = _unset(
        "output folder: metrics.jsonl, loss.png, checkpoints/, adapter/ (jpeft) and "
        "hf_adapter/ (Hugging Face PEFT); required",
        metavar="DIR",
    )
    resume: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "continue from the newest train state in OUT/checkpoints (same data "
            "order, same result as an uninterrupted run)"
        },
    )
    base_model_name: str | None = _unset(
        "base_model_name_or_path written into hf_adapter/adapter_config.json (e.g. "
        "HuggingFaceTB/SmolLM2-135M-Instruct)",
        metavar="NAME",
        shown_default="MODEL as given",
    )
    progress: bool = dataclasses.field(
        default=True, metadata={"help": "show a progress bar with loss and tokens/s"}
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedOptions:
    coordinator: str | None = _unset(
        "host:port of process 0, for training on several hosts (jax.distributed); or "
        "JPEFT_COORDINATOR",
        metavar="HOST:PORT",
        shown_default="single process",
    )
    num_processes: int | None = _unset(
        "number of processes of a multi-host run; or JPEFT_NUM_PROCESSES",
        metavar="N",
        shown_default="single process",
    )
    process_id: int | None = _unset(
        "this process's index, 0 to N-1; or JPEFT_PROCESS_ID",
        metavar="I",
        shown_default="single process",
    )

    def __post_init__(self):
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"--num-processes must be at least 1, got {self.num_processes}")
        if self.process_id is not None and self.process_id < 0:
            raise ValueError(f"--process-id must be at least 0, got {self.process_id}")
