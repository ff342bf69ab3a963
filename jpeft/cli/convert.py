"""``jpeft merge``, ``export-hf`` and ``import-hf``: an adapter folded into a Hugging Face
model folder, or converted between jpeft's and Hugging Face PEFT's adapter formats."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from jpeft.cli.common import (
    DTYPES,
    EXIT_OK,
    UsageError,
    adapter_kind,
    existing,
    load_model,
    load_tokenizer,
    with_adapter,
)


def add_parsers(commands: Any) -> None:
    merge = commands.add_parser(
        "merge",
        help="fold an adapter into the base and write a Hugging Face model folder",
        description="Folds the adapter into MODEL's weights (W + scale * A @ B for LoRA) and "
        "writes a Hugging Face model folder (config.json, model.safetensors and the "
        "tokenizer) that transformers.AutoModelForCausalLM.from_pretrained loads; from a "
        ".gguf file the weights are dequantised.",
        epilog="example: jpeft merge model.gguf --adapter out/run/adapter --out out/merged",
    )
    _model_arg(merge)
    merge.add_argument(
        "--adapter",
        metavar="DIR",
        required=True,
        help="a jpeft or Hugging Face PEFT adapter folder, or a 'jpeft train' output folder; "
        "required",
    )
    merge.add_argument("--out", metavar="DIR", required=True, help="the folder to write; required")
    merge.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="dtype of the merged weights written (default: float32)",
    )

    export = commands.add_parser(
        "export-hf",
        help="convert a jpeft adapter to a Hugging Face PEFT (or AdapterHub) adapter",
        description="Writes a jpeft adapter as a Hugging Face PEFT adapter folder "
        "(adapter_config.json + adapter_model.safetensors) that peft.PeftModel.from_pretrained, "
        "transformers and vLLM load, or, for bottleneck adapters, which PEFT lacks, as a "
        "folder AdapterHub's load_adapter reads. MODEL is the base the adapter was trained on.",
        epilog="example: jpeft export-hf model.gguf --adapter out/run/adapter --out out/hf",
    )
    _model_arg(export)
    export.add_argument(
        "--adapter",
        metavar="DIR",
        required=True,
        help="the jpeft adapter folder (or a 'jpeft train' output folder); required",
    )
    export.add_argument("--out", metavar="DIR", required=True, help="the folder to write; required")
    export.add_argument(
        "--format",
        choices=("auto", "peft", "adapterhub"),
        default="auto",
        help="the folder's format (default: AdapterHub's for bottleneck adapters, else PEFT's)",
    )
    export.add_argument(
        "--base-model-name",
        metavar="NAME",
        help="base_model_name_or_path written into adapter_config.json (default: the one "
        "recorded at training, else MODEL as given)",
    )

    imp = commands.add_parser(
        "import-hf",
        help="convert a Hugging Face PEFT (or AdapterHub) adapter to a jpeft adapter",
        description="Reads a Hugging Face PEFT adapter folder, or an AdapterHub one (told "
        "apart by its weights file), onto MODEL and saves it as a jpeft adapter folder "
        "(Orbax), e.g. to continue training it in jpeft.",
        epilog="example: jpeft import-hf model.gguf --adapter peft_adapter/ --out out/adapter",
    )
    _model_arg(imp)
    imp.add_argument(
        "--adapter",
        metavar="HF_DIR",
        required=True,
        help="the Hugging Face PEFT adapter folder (adapter_config.json + "
        "adapter_model.safetensors) or AdapterHub's (adapter.safetensors or "
        "pytorch_adapter.bin); required",
    )
    imp.add_argument(
        "--out", metavar="DIR", required=True, help="the jpeft adapter folder to write; required"
    )


def _model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL", help="the base model: a Hugging Face model folder or a .gguf file"
    )


def merge(args: argparse.Namespace) -> int:
    from jpeft import models, tree

    model_path = existing(args.model, "model")
    model, base = load_model(model_path, args.dtype)
    try:
        merged = tree.materialize(with_adapter(base, args.adapter))
    except TypeError as err:  # prompt or prefix tuning: nothing to fold into the weights
        raise UsageError(f"{args.adapter}: {err}") from err
    tokenizer = load_tokenizer(model_path, required=False)
    state = models.save_pretrained(
        model, merged, args.out, config=models.read_config(model_path), tokenizer=tokenizer
    )
    print(
        f"merged {sum(v.size for v in state.values()):,d} parameters ({len(state)} tensors, "
        f"{args.dtype}) into {args.out}"
    )
    if tokenizer is None:
        print(
            f"warning: {model_path} has no tokenizer that transformers can load; none was written",
            file=sys.stderr,
        )
    return EXIT_OK


def export_hf(args: argparse.Namespace) -> int:
    from jpeft import bottleneck, checkpoint, tree
    from jpeft.hf import adapterhub, peft_format

    kind, folder = adapter_kind(args.adapter)
    if kind != "jpeft":
        known = {"hf": "a Hugging Face PEFT", "adapterhub": "an AdapterHub"}[kind]
        raise UsageError(f"{folder} is already {known} adapter")
    _, base = load_model(args.model)
    params = checkpoint.load_adapter(base, folder)
    name = args.base_model_name
    if name is None:
        stored = checkpoint.read_adapter_metadata(folder).get("config") or {}
        name = stored.get("base_model_name_or_path") or str(args.model)
    form = args.format
    if form == "auto":
        has_bottleneck = any(
            isinstance(x, bottleneck.BottleneckAdapter) for _, x in tree.iter_nodes(params)
        )
        form = "adapterhub" if has_bottleneck else "peft"
    if form == "adapterhub":
        written = adapterhub.export_adapterhub(params, args.out)
        print(f"wrote the AdapterHub adapter {written}")
        return EXIT_OK
    written = peft_format.export_peft(params, args.out, base_model_name_or_path=name)
    print(f"wrote {written / peft_format.CONFIG_FILE} and {written / peft_format.WEIGHTS_FILE}")
    return EXIT_OK


def import_hf(args: argparse.Namespace) -> int:
    from jpeft import checkpoint
    from jpeft.hf import peft_format

    kind, folder = adapter_kind(args.adapter)
    if kind == "jpeft":
        raise UsageError(
            f"{folder} is not a Hugging Face PEFT or AdapterHub adapter (it has no "
            f"{peft_format.CONFIG_FILE})"
        )
    _, base = load_model(args.model)
    params = with_adapter(base, folder)
    # Both formats name their config adapter_config.json; the import has read it already.
    stored = json.loads((folder / peft_format.CONFIG_FILE).read_text())
    config = {**stored, "imported_from": str(folder)}
    checkpoint.save_adapter(params, args.out, config=config)
    print(f"wrote the jpeft adapter {args.out}")
    return EXIT_OK
