"""``jpeft generate``: complete prompts with a model, with or without adapters.

With several ``--adapter NAME=DIR``, the adapters are stacked over the one base
(:mod:`jpeft.adapters`) and the rows of ``--prompts rows.jsonl``, each naming its adapter,
run as mixed batches: one compiled program for all of them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from jpeft.cli import options
from jpeft.cli.common import (
    DTYPES,
    EXIT_OK,
    UsageError,
    existing,
    load_model,
    load_tokenizer,
    named_adapters,
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
        help="generate text with a model, with or without adapters",
        description="Generates a completion for each prompt with MODEL, optionally with an "
        "adapter, and prints it (one block per prompt when there are several). With several "
        "adapters (--adapter NAME=DIR, repeated), each row of --prompts names its adapter and "
        "the rows run as mixed batches over the one base.",
        epilog="examples: jpeft generate model.gguf --adapter out/run/adapter --chat "
        "--prompt 'Extract the person as JSON: ...'; jpeft generate model.gguf --adapter "
        "sql=out/sql --adapter poem=out/poem --prompts rows.jsonl (rows like "
        '{"adapter": "sql", "prompt": "..."} or {"adapter": null, "messages": [...]})',
    )
    gen.add_argument(
        "model", metavar="MODEL", help="the base model: a Hugging Face model folder or a .gguf file"
    )
    gen.add_argument(
        "--adapter",
        metavar="[NAME=]DIR",
        action="append",
        default=[],
        help="an adapter folder: a jpeft adapter (jpeft_adapter.json), a Hugging Face PEFT "
        "or AdapterHub adapter, or a 'jpeft train' output folder; repeat it, as NAME=DIR, "
        "for several adapters over the one base (default: none, the base model)",
    )
    gen.add_argument(
        "--prompt",
        metavar="TEXT",
        nargs="+",
        action="extend",
        help="one or more prompts (the flag may be repeated); --prompt or --prompts is required",
    )
    gen.add_argument(
        "--prompts",
        metavar="ROWS.jsonl",
        help='a JSON-lines file of rows {"adapter": NAME or null, "prompt": TEXT} or '
        '{"adapter": ..., "messages": [{"role", "content"}, ...]} (a chat); '
        "null is the base model. --prompt or --prompts is required",
    )
    gen.add_argument(
        "--batch-size",
        type=options.argparse_type(_positive_int, False, "N"),
        default=8,
        metavar="N",
        help="prompts per batch of --prompts (default: 8)",
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
    from jpeft import adapters

    if (args.prompt is None) == (args.prompts is None):
        raise UsageError("give the prompts with --prompt or --prompts (one of the two)")
    if args.system and not args.chat:
        raise UsageError("--system needs --chat")
    named = named_adapters(args.adapter)
    rows = _rows(args) if args.prompts else [(None, p) for p in args.prompt]
    model_path = existing(args.model, "model")
    tokenizer = load_tokenizer(model_path)
    model, params = load_model(model_path, args.dtype)
    if len(named) > 1 or args.prompts:
        if args.prompt:
            raise UsageError(
                "with several adapters, give the prompts with --prompts, each row naming its "
                "adapter"
            )
        multi = _stacked(params, named)
        params = multi.params
    elif named:
        params = with_adapter(params, next(iter(named.values())))
    answers = []
    size = args.batch_size if args.prompts else len(rows)  # --prompt: one batch, as before
    for start in range(0, len(rows), size):
        batch = rows[start : start + size]
        ids = None
        if args.prompts:
            try:
                ids = adapters.adapter_ids(multi, [name for name, _ in batch])
            except KeyError as err:
                raise UsageError(f"{args.prompts}: {err.args[0]}") from None
        answers += jpeft.generate(
            model,
            params,
            tokenizer,
            [_prompt(args, prompt) for _, prompt in batch],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            adapter_ids=ids,
        )
    for i, ((name, prompt), answer) in enumerate(zip(rows, answers, strict=True)):
        if len(answers) > 1 or args.prompts:
            shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            via = f" [{name or 'base'}]" if args.prompts else ""
            print(f"--- prompt {i + 1}{via}: {shown}")
        print(answer)
    return EXIT_OK


def _prompt(args: argparse.Namespace, prompt: Any) -> Any:
    """A chat for ``--chat`` text prompts (with the ``--system`` message), else `prompt`."""
    if not args.chat or not isinstance(prompt, str):
        return prompt
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + [{"role": "user", "content": prompt}]


def _stacked(params: dict, named: dict[str, str]):
    from jpeft import adapters

    if not named:
        raise UsageError("--prompts needs at least one --adapter NAME=DIR")
    for folder in named.values():
        existing(folder, "adapter")
    try:
        return adapters.load(params, named)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _rows(args: argparse.Namespace) -> list[tuple[str | None, Any]]:
    """``(adapter name or None, text or chat)`` of every row of ``--prompts``."""
    path = existing(args.prompts, "prompts file")
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or "adapter" not in row:
            raise UsageError(f'{where}: expected an object with an "adapter" (a name, or null)')
        name = row["adapter"]
        if name is not None and not isinstance(name, str):
            raise UsageError(f'{where}: "adapter" must be a name or null, got {name!r}')
        if isinstance(row.get("prompt"), str) and row["prompt"]:
            rows.append((name, row["prompt"]))
        elif _is_chat(row.get("messages")):
            rows.append((name, row["messages"]))
        else:
            raise UsageError(
                f'{where}: expected a non-empty "prompt" text or "messages" '
                '[{"role": ..., "content": ...}, ...]'
            )
    if not rows:
        raise UsageError(f"{path} holds no rows")
    return rows


def _is_chat(messages: Any) -> bool:
    return (
        isinstance(messages, list)
        and bool(messages)
        and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)
    )
