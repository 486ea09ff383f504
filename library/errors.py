"""User-facing errors.

A :class:`UserError` describes a problem with something the user gave us (a flag, a config file, an
image, a checkpoint). Scripts run their ``main`` through :func:`run_cli`, which prints the message and
exits with status 2, without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import gc
import sys
from typing import Callable, Iterable, NoReturn


class UserError(Exception):
    """A problem in the user's input, explained in ``message`` (which says what to do about it).

    An error made by :meth:`from_problems` also keeps its ``title`` and its list of ``problems``, so a caller
    that gathers problems from several checks can merge them without re-reading the message text."""

    def __init__(self, message: str, *, title: str = "", problems: Iterable[str] = ()):
        super().__init__(message)
        self.message = message
        self.title = title
        self.problems = list(problems)

    @classmethod
    def from_problems(cls, title: str, problems: Iterable[str]) -> "UserError":
        """One error that lists several problems found at once."""
        items = list(problems)
        body = "\n".join(f"  - {p}" for p in items)
        noun = "problem" if len(items) == 1 else "problems"
        return cls(f"{title}: {len(items)} {noun}\n{body}", title=title, problems=items)

    def items(self) -> list[str]:
        """Each listed problem prefixed with the short title (``title: problem``), or the message itself."""
        if not self.problems:
            return [self.message]
        short = self.title.split(":")[0]
        return [f"{short}: {p}" for p in self.problems]


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a script's ``main``; a :class:`UserError` becomes a message on stderr and exit status 2.

    The objects that exist when ``main`` starts (the millions that torch, diffusers and transformers create on
    import) and those alive when it ends are moved out of the cyclic garbage collector's reach
    (``gc.freeze``): they live until the process ends anyway, and scanning them made every full collection
    during the run, and the interpreter's collections at exit, cost about a second each."""
    gc.freeze()
    try:
        code = main()
    except UserError as err:
        print(f"error: {err.message}", file=sys.stderr)
        _exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        _exit(130)
    _exit(code or 0)


def _exit(code: int) -> NoReturn:
    gc.freeze()
    sys.exit(code)
