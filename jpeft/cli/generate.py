"""``jpeft generate``: complete prompts with a model, with or without an adapter."""

from __future__ import annotations

import argparse
from typing import Any

from jpeft.cli import options
from jpeft.cli.common import (
    DTYPES,
    EXIT_OK,
    UsageError,
    existing,
    load_model,
    load_tokenizer,
    with_adapter,
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"expected a positive integer, got {text}")
    return value


def add_parser(commands: Any) -> None:
    gen = commands.add_parser(
        "generate",
        help="generate text with a model, with or without an adapter",
        description="Generates a completion for each --prompt with MODEL, optionally with an "
        "adapter, and prints it (one block per prompt when there are several).",
        epilog="example: jpeft generate model.gguf --adapter out/run/adapter --chat "
        "--prompt 'Extract the person as JSON: ...'",
    )
    gen.add_argument(
        "model", metavar="MODEL", help="the base model: a Hugging Face model folder or a .gguf file"
    )
    gen.add_argument(
        "--adapter",
        metavar="DIR",
        help="an adapter folder: a jpeft adapter (jpeft_adapter.json), a Hugging Face PEFT "
        "adapter (adapter_config.json) or a 'jpeft train' output folder (default: none, the "
        "base model)",
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
        help="send each prompt as a user message through the tokenizer's chat template "
        "(default: off, raw text)",
    )
    gen.add_argument("--system", metavar="TEXT", help="a system message for --chat (default: none)")
    gen.add_argument(
        "--max-new-tokens",
        type=options.argparse_type(_positive_int, False, "N"),
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
        help="nucleus sampling: sample among the most likely tokens holding this much "
        "probability (default: 1.0)",
    )
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    gen.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="dtype of the base weights (default: float32)",
    )


def run(args: argparse.Namespace) -> int:
    import jpeft

    model_path = existing(args.model, "model")
    tokenizer = load_tokenizer(model_path)
    model, params = load_model(model_path, args.dtype)
    if args.adapter:
        params = with_adapter(params, args.adapter)
    prompts: list[Any] = list(args.prompt)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [system + [{"role": "user", "content": p}] for p in prompts]
    elif args.system:
        raise UsageError("--system needs --chat")
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
