"""``jpeft merge``, ``export-hf`` and ``import-hf``: an adapter folded into a Hugging Face
model folder, several LoRA adapters combined into one (:mod:`jpeft.lora_combination`), or an
adapter converted between jpeft's and Hugging Face PEFT's adapter formats."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from jpeft import lora_combination
from jpeft.cli.common import (
    DTYPES,
    EXIT_OK,
    UsageError,
    adapter_kind,
    existing,
    load_model,
    load_tokenizer,
    named_adapters,
    with_adapter,
)


def add_parsers(commands: Any) -> None:
    merge = commands.add_parser(
        "merge",
        help="fold an adapter into the base, or combine several adapters into one",
        description="With one adapter: folds it into MODEL's weights (W + scale * A @ B for "
        "LoRA) and writes a Hugging Face model folder (config.json, model.safetensors and the "
        "tokenizer) that transformers.AutoModelForCausalLM.from_pretrained loads; from a .gguf "
        "file the weights are dequantised. With several LoRA adapters (--adapter NAME=DIR, "
        "repeated) or --combination: combines them into one LoRA adapter as Hugging Face "
        "PEFT's add_weighted_adapter does (jpeft.lora_combination) and writes it as a jpeft "
        "adapter folder (convert it with 'jpeft export-hf'), or, with --full, the base with "
        "the combined adapter folded in.",
        epilog="examples: jpeft merge model.gguf --adapter out/run/adapter --out out/merged; "
        "jpeft merge model.gguf --adapter a=out/a/adapter --adapter b=peft_b/ --weights 0.7,0.3 "
        "--combination ties --density 0.5 --out out/combined",
    )
    _model_arg(merge)
    merge.add_argument(
        "--adapter",
        metavar="[NAME=]DIR",
        action="append",
        required=True,
        help="a jpeft or Hugging Face PEFT adapter folder, or a 'jpeft train' output folder, "
        "optionally named (NAME=DIR); repeat it to combine adapters; required",
    )
    merge.add_argument("--out", metavar="DIR", required=True, help="the folder to write; required")
    merge.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="dtype of the merged weights written (default: float32)",
    )
    combination = merge.add_argument_group(
        "combining adapters", "options of jpeft.lora_combination.combine (peft's names)"
    )
    combination.add_argument(
        "--weights",
        metavar="W1,W2,...",
        help="one weight per adapter, in --adapter order, of any sign (default: 1 each)",
    )
    combination.add_argument(
        "--combination",
        choices=lora_combination.COMBINATION_TYPES,
        metavar="TYPE",
        help="how to combine: " + ", ".join(lora_combination.COMBINATION_TYPES) + " (default: "
        "svd when several adapters are given, peft's default; cat is exact, at the sum of "
        "the ranks)",
    )
    combination.add_argument(
        "--density",
        type=float,
        metavar="D",
        help="fraction of entries kept by the pruning types (ties, dare_*, magnitude_prune "
        "and their _svd forms); required by those, no default",
    )
    combination.add_argument(
        "--majority-sign-method",
        choices=lora_combination.SIGN_METHODS,
        default="total",
        help="how ties and dare_ties elect the sign of each entry (default: total)",
    )
    combination.add_argument(
        "--svd-rank",
        type=int,
        metavar="R",
        help="rank of the result of the SVD types (default: the largest adapter rank)",
    )
    combination.add_argument(
        "--svd-clamp",
        type=float,
        metavar="Q",
        help="clamp the SVD types' factors at this quantile of their entries (default: none)",
    )
    combination.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of DARE's random pruning (default: 0)",
    )
    combination.add_argument(
        "--full",
        action="store_true",
        help="write the base with the combined adapter folded in (a Hugging Face model "
        "folder) instead of the combined adapter (default: off; always on with one adapter "
        "and no --combination or --weights)",
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
    from jpeft import checkpoint, models, tree

    model_path = existing(args.model, "model")
    adapters = named_adapters(args.adapter)
    combining = len(adapters) > 1 or args.combination is not None or args.weights is not None
    if not combining:
        given = [f for f in _COMBINATION_ONLY if getattr(args, _dest(f)) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} apply only when combining adapters")
    model, base = load_model(model_path, args.dtype)
    if combining:
        params, config = _combine(base, adapters, args)
        if not args.full:
            checkpoint.save_adapter(
                params, args.out, config={**config, "base_model_name_or_path": str(model_path)}
            )
            print(
                f"wrote the {config['combination_type']} combination of {', '.join(adapters)} "
                f"(weights {config['weights']}) as the jpeft adapter {args.out}"
            )
            return EXIT_OK
    else:
        params = with_adapter(base, next(iter(adapters.values())))
    try:
        merged = tree.materialize(params)
    except TypeError as err:  # prompt or prefix tuning: nothing to fold into the weights
        raise UsageError(f"{args.adapter[0]}: {err}") from err
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


# merge options that mean something only when adapters are combined (and have no default)
_COMBINATION_ONLY = ("--density", "--svd-rank", "--svd-clamp")


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _combine(base: dict, adapters: dict[str, str], args: argparse.Namespace) -> tuple[dict, dict]:
    """The combined LoRA adapter over `base`, and the options that made it."""
    import jax

    weights = _weights(args.weights, len(adapters))
    config = {
        "combination_type": args.combination or "svd",
        "adapters": {name: str(folder) for name, folder in adapters.items()},
        "weights": weights,
        "density": args.density,
        "majority_sign_method": args.majority_sign_method,
        "svd_rank": args.svd_rank,
        "svd_clamp": args.svd_clamp,
        "seed": args.seed,
    }
    trees = [with_adapter(base, folder) for folder in adapters.values()]
    try:
        params = lora_combination.combine(
            trees,
            weights,
            combination_type=config["combination_type"],
            svd_rank=args.svd_rank,
            svd_clamp=args.svd_clamp,
            density=args.density,
            majority_sign_method=args.majority_sign_method,
            key=jax.random.key(args.seed),
        )
    except ValueError as err:
        names = ", ".join(f"{i} is {n}={f}" for i, (n, f) in enumerate(adapters.items()))
        raise UsageError(f"{err} (adapter {names})") from err
    return params, config


def _weights(text: str | None, count: int) -> list[float]:
    if text is None:
        return [1.0] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights {text}: expected numbers separated by commas") from None
    if len(weights) != count:
        raise UsageError(f"--weights {text}: {len(weights)} weights for {count} adapters")
    return weights


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
