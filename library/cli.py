"""The argument parser of every script: a mistake on the command line is one short :class:`UserError`.

Unknown options get a "did you mean" with the closest known options; other argparse errors (a bad value,
an invalid choice) keep argparse's wording. Neither prints the long usage text (``--help`` does).
"""

from __future__ import annotations

import argparse
import difflib
import math
from typing import NoReturn, Sequence

from library.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """``hints`` maps options this script does not take to an explanation (e.g. which script takes them)."""

    def __init__(self, *args, hints: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hints = dict(hints or {})

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            known = [o for o in self._option_string_actions if o.startswith("--")]
            problems: list[str] = []
            for item in unknown:
                name = item.split("=", 1)[0]
                if not name.startswith("-"):
                    if problems and problems[-1].startswith("-"):  # the value of an unknown option
                        continue
                    problems.append(f"{item}: unexpected value")
                    continue
                close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
                hint = f": {self.hints[name]}" if name in self.hints else (
                    f"; did you mean {' or '.join(close)}?" if close else "")
                problems.append(f"{item}: unknown option{hint}")
            raise UserError.from_problems(f"{self.prog}: unrecognized arguments (see --help)", problems)
        return parsed

    def _get_value(self, action: argparse.Action, arg_string: str) -> object:
        """Every float option refuses nan and inf (a NaN multiplier or learning rate would only show up as a
        NaN loss much later, blamed on something else)."""
        value = super()._get_value(action, arg_string)
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentError(action, f"must be a finite number (got {arg_string!r})")
        return value

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message} (see --help)")


def non_negative_int(text: str) -> int:
    """An argparse ``type`` for counts where 0 means none (e.g. data loader workers)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value
