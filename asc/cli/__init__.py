"""The ``asc`` command line: parse arguments, call the library, print results.

Every user error surfaces as an :class:`~asc.errors.AscError` and is printed as one line on stderr
with exit status 2; anything else is a bug and keeps its traceback. Each command group lives in a
module of this package with a ``register(subparsers)`` function and an ``ORDER`` (its place in
``--help``); a new module joins without editing this file. Handlers import their library code
when they run, so ``asc --help`` and the torch-free deployment commands never pay for torch.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TextIO

from asc import __version__
from asc.cli.common import EXIT_USAGE, Parser
from asc.errors import AscError
from asc.threads import prefer_sleeping_openmp_waits


def command_modules() -> list[ModuleType]:
    """The modules of this package that define commands, in ``--help`` order."""
    modules = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)]
    return sorted((m for m in modules if hasattr(m, "register")), key=lambda m: (m.ORDER, m.__name__))


def build_parser() -> Parser:
    parser = Parser(prog="asc", description="On-device acoustic scene classification toolkit.")
    parser.add_argument("--version", action="version", version=f"asc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for module in command_modules():
        module.register(sub)
    return parser


@contextmanager
def asc_warnings_as_lines() -> Iterator[None]:
    """Warnings that asc's own code raises print as one ``asc: warning:`` line; others as Python prints them."""
    package = Path(__file__).resolve().parents[1]
    shown = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        if Path(filename).resolve().is_relative_to(package):
            print(f"asc: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def main(argv: Sequence[str] | None = None) -> int:
    prefer_sleeping_openmp_waits()  # before a handler imports torch
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow options (argparse only takes them before the first option)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    if extra != overrides or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    try:
        with asc_warnings_as_lines():
            return args.handler(args)
    except AscError as error:
        print(f"asc: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("asc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
