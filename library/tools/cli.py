"""Argument parsing for the tool scripts: unknown options are a UserError with a "did you mean"."""

from __future__ import annotations

import argparse
import difflib
from typing import Sequence

from library.errors import UserError


class ToolArgumentParser(argparse.ArgumentParser):
    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            known = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            problems = []
            for item in unknown:
                name = item.split("=", 1)[0]
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6) if name.startswith("-") else []
                hint = f"; did you mean {close[0]}?" if close else ""
                problems.append(f"{item}: unknown option{hint}")
            raise UserError.from_problems(f"{self.prog}: unrecognized arguments", problems)
        return parsed
