"""The ``jpeft`` command line: ``train | generate | merge | export-hf | import-hf | inspect |
bench``.

Each command is a thin layer over the library, one module per group: :mod:`~jpeft.cli.train`
(:func:`jpeft.trainer.fit` with any registered method), :mod:`~jpeft.cli.generate`
(:func:`jpeft.generate`), :mod:`~jpeft.cli.convert` (merge, export-hf, import-hf) and
:mod:`~jpeft.cli.inspect`, and :mod:`~jpeft.cli.bench` (the comparison with Hugging Face
PEFT of ``bench/``). Every option of ``jpeft train`` comes from a config dataclass and
can also come from a YAML or JSON file (``--config``), with command-line flags taking
precedence (:mod:`~jpeft.cli.options`).

Exit codes: 0 success; 1 training failed (a NaN or infinite loss); 2 bad input (a missing
file, a malformed dataset, checkpoint or config; the message says which), printed as
``jpeft: error: <message>`` without a traceback; 130 interrupted by Ctrl-C (``jpeft train``
saves a resumable train state first).

Example::

    jpeft train model.gguf --data train.jsonl --eval-split 0.1 --out out/run \\
        --rank 8 --alpha 16 --targets all-linear --lr 1e-3 --epochs 2
    jpeft generate model.gguf --adapter out/run/adapter --chat --prompt "Hi!"
    jpeft merge model.gguf --adapter out/run/adapter --out out/merged
    jpeft merge model.gguf --adapter math=out/math/adapter --adapter code=peft_code/ \\
        --weights 0.7,0.3 --combination ties --density 0.5 --out out/combined
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jpeft import compile_cache
from jpeft.cli import bench, convert, generate, inspect, train
from jpeft.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, UsageError

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "UsageError",
    "build_parser",
    "main",
]

_COMMANDS = {
    "train": train.run,
    "generate": generate.run,
    "merge": convert.merge,
    "export-hf": convert.export_hf,
    "import-hf": convert.import_hf,
    "inspect": inspect.run,
    "bench": bench.run,
}


def build_parser(method: str = train.DEFAULT_METHOD) -> argparse.ArgumentParser:
    """The ``jpeft`` argument parser with all its sub-commands; ``train`` has the options
    of `method` (a registered PEFT method)."""
    parser = argparse.ArgumentParser(
        prog="jpeft",
        description="Parameter-efficient fine-tuning in JAX: train an adapter, generate "
        "with it, merge it, convert it to and from Hugging Face PEFT, inspect checkpoints, "
        "benchmark against Hugging Face PEFT. "
        "Run 'jpeft COMMAND --help' for the options of a command.",
        epilog="exit codes: 0 success, 1 training failed (NaN loss), 2 bad input, 130 interrupted",
    )
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="show the full traceback of an error instead of one line (default: off)",
    )
    parser.add_argument(
        "--compile-cache",
        metavar="DIR|off",
        help="keep compiled XLA programs in DIR, so that the next run loads them instead of "
        f"compiling (default: ${compile_cache.ENV_VARIABLE}, else a folder per jaxlib and CPU "
        "kind under ~/.cache/jpeft/xla); 'off' compiles everything afresh",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train.add_parser(commands, method)
    generate.add_parser(commands)
    convert.add_parsers(commands)
    inspect.add_parser(commands)
    bench.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``jpeft`` with `argv` (default: ``sys.argv[1:]``) and returns the exit code."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    traceback = "--traceback" in argv
    try:
        parser = build_parser(train.requested_method(argv))
    except ValueError as err:  # an unknown --method
        print(f"jpeft: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse has printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_BAD_INPUT
    if args.command != "bench":  # bench's workers are processes of their own
        compile_cache.enable(args.compile_cache)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("jpeft: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as err:  # CheckpointError and DataError are ValueErrors
        if traceback:
            raise
        print(f"jpeft: error: {_message(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _message(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError) and err.filename:
        return f"{err.filename} does not exist"
    return str(err) or type(err).__name__
