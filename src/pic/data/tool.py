"""The command line every data tool shares (``python -m pic.data.make_zip``, ``sort_val``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def run_tool(prog: str, description: str, paths: dict[str, str], work: Callable[..., str],
             argv: list[str] | None = None) -> int:
    """Parse the positional path arguments ``paths`` (name: help), print ``work(*paths)``'s
    report and return 0; a bad path or input (OSError, ValueError) is one line on stderr
    naming it, and exit status 1."""
    parser = argparse.ArgumentParser(prog=f"python -m pic.data.{prog}", description=description)
    for name, help_text in paths.items():
        parser.add_argument(name, type=Path, help=help_text)
    args = parser.parse_args(argv)
    try:
        report = work(*(getattr(args, name) for name in paths))
    except (OSError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    print(report)
    return 0
