"""What every ``asc`` subcommand shares: the parser class, exit codes and small argument types.

This module and the parser it builds import neither torch nor the training code, so
``asc --help`` and the deployment commands start in a fraction of a second; each command imports
what it needs inside its handler.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import NoReturn

EXIT_OK = 0
EXIT_SOME_FAILED = 1  #: a batch command finished, but some items failed (each got an error line)
EXIT_USAGE = 2  #: bad usage or input: nothing usable was done

EXIT_CODES_HELP = ("exit status: 0 done; 1 some items failed (each named on stderr, the rest done); "
                   "2 bad usage or input, nothing usable")

Handler = Callable[[argparse.Namespace], int]
Subparsers = argparse._SubParsersAction


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors, like every other asc error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_command(sub: Subparsers, name: str, handler: Handler, *, help: str, description: str,
                quiet: bool = True) -> argparse.ArgumentParser:
    """A subcommand whose help ends with the exit-status contract; ``--quiet`` unless told otherwise."""
    parser = sub.add_parser(name, help=help, description=description, epilog=EXIT_CODES_HELP)
    if quiet:
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=handler)
    return parser


def positive_int(text: str) -> int:
    """A count such as ``--repeats 20``: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of at least 1")
    return value


def shape(text: str) -> tuple[int, ...]:
    """A tensor shape written ``1,1,128,44`` or, as asc prints shapes, ``1x1x128x44``."""
    parts = re.split(r"[,x×]", text.strip())
    try:
        dims = tuple(int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape such as 1x1x256x431 or 1,1,256,431") from None
    if not dims or any(dim <= 0 for dim in dims):
        raise argparse.ArgumentTypeError(f"'{text}': every dimension of a shape must be a positive integer")
    return dims
