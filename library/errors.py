"""User-facing errors.

A :class:`UserError` describes a problem with something the user gave us (a flag, a config file, an
image, a checkpoint). Scripts run their ``main`` through :func:`run_cli`, which prints the message and
exits with status 2, without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable, NoReturn


class UserError(Exception):
    """A problem in the user's input, explained in ``message`` (which says what to do about it)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
        self.problems = [message]  # the single problems of a from_problems error, for merging into another list

    @classmethod
    def from_problems(cls, title: str, problems: Iterable[str]) -> "UserError":
        """One error that lists several problems found at once."""
        items = list(problems)
        body = "\n".join(f"  - {p}" for p in items)
        noun = "problem" if len(items) == 1 else "problems"
        err = cls(f"{title}: {len(items)} {noun}\n{body}")
        err.problems = items
        return err


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a script's ``main``; a :class:`UserError` becomes a message on stderr and exit status 2."""
    try:
        code = main()
    except UserError as err:
        print(f"error: {err.message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
