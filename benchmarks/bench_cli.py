"""The benchmarks' command-line error handling: a user mistake is one line and exit code 2."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def fail(message: str) -> NoReturn:
    """A user mistake: one line on stderr, exit status 2, no traceback."""
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors end like every other mistake: one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(message)
