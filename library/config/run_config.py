"""``--config_file`` (whole-run options in TOML) and ``--output_config``.

Unlike sd-scripts, every key is checked against the script's options: unknown keys (with a "did you
mean"), wrong types, bad choices and misuse of flags are all reported at once. Sections are only for
readability: ``[training] learning_rate = 1e-4`` is the same as ``learning_rate = 1e-4``. Options given
on the command line override the file.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from library.config.arguments import float_range_arg, resolution_arg
from library.config.raw import read_config_text
from library.config.schema import describe_value, did_you_mean
from library.errors import UserError
from library.io_utils import atomic_write_text

_SECRET_SUFFIXES = ("_api_key", "_token", "_secret", "_password")
_NOT_IN_FILES = ("config_file", "output_config")
_COMMA_LIST_TYPES = (resolution_arg, float_range_arg)  # also accept TOML lists: [512, 768] -> "512,768"


def is_secret(name: str) -> bool:
    """Options never written by ``--output_config`` (wandb_api_key, huggingface_token, ...)."""
    return name.endswith(_SECRET_SUFFIXES)


def config_path(value: str) -> Path:
    """The --config_file path, with ``.toml`` appended when missing (as sd-scripts does)."""
    return Path(value if value.endswith(".toml") else value + ".toml")


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    skip = (argparse._HelpAction, argparse._VersionAction)
    return {a.dest: a for a in parser._actions if a.dest != argparse.SUPPRESS and not isinstance(a, skip)}


def _type_name(action: argparse.Action) -> str:
    t = action.type
    if t is int:
        return "an integer"
    if t is float:
        return "a number"
    if t is None or t is str:
        return "a string"
    return f"a valid {getattr(t, '__name__', 'value')}"


def _convert_one(action: argparse.Action, value: Any) -> Any:
    """One value converted with the action's type; raises ValueError with a readable message."""
    t = action.type
    if t in _COMMA_LIST_TYPES and isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        value = ",".join(str(v) for v in value)
    if isinstance(value, (dict, list)):
        raise ValueError(f"expected {_type_name(action)}, found {describe_value(value)}")
    if isinstance(value, bool) and t is not bool:
        raise ValueError(f"expected {_type_name(action)}, found {describe_value(value)}")
    if t is int:
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"expected an integer, found {describe_value(value)}")
    if t is float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"expected a number, found {describe_value(value)}") from None
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, found {describe_value(value)}")
        return number
    if t is None or t is str:
        return value if isinstance(value, str) else str(value)
    try:
        return t(value if isinstance(value, str) else str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        raise ValueError(f"expected {_type_name(action)}, found {describe_value(value)}: {err}") from None


def _check_choice(action: argparse.Action, value: Any) -> None:
    if action.choices is not None and value not in action.choices:
        choices = [str(c) for c in action.choices]
        raise ValueError(f"{describe_value(value)} is not one of: {', '.join(choices)}."
                         f"{did_you_mean(str(value), choices)}")


def _convert(action: argparse.Action, value: Any) -> Any:
    """A config value converted and checked as argparse would check it on the command line."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ValueError(f"is a flag: expected true or false, found {describe_value(value)}")
        return value
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"expected a count (0, 1, 2, ...), found {describe_value(value)}")
        return value
    if isinstance(action, argparse._StoreConstAction):
        if value not in (action.const, action.default):
            raise ValueError(f"expected {action.const!r} or {action.default!r}, found {describe_value(value)}")
        return value
    many = action.nargs in ("*", "+") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction)
    if not many:
        out = _convert_one(action, value)
        _check_choice(action, out)
        return out
    items = value if isinstance(value, list) else [value]
    out_items = [_convert_one(action, v) for v in items]
    for item in out_items:
        _check_choice(action, item)
    if isinstance(action.nargs, int) and len(out_items) != action.nargs:
        raise ValueError(f"expected a list of {action.nargs} values, found {describe_value(value)}")
    if action.nargs == "+" and not out_items:
        raise ValueError("expected at least one value, found an empty list")
    return out_items


def _flatten(data: dict[str, Any], source: Path, problems: list[str]) -> dict[str, tuple[Any, str]]:
    """Top-level tables are sections whose keys count as top-level keys; returns key -> (value, place)."""
    flat: dict[str, tuple[Any, str]] = {}
    for key, value in data.items():
        entries = value.items() if isinstance(value, dict) else [(key, value)]
        section = f"[{key}]" if isinstance(value, dict) else "top level"
        for name, item in entries:
            if name in flat:
                problems.append(f"{source}: `{name}` is set twice ({flat[name][1]} and {section}); keep one")
                continue
            flat[name] = (item, section)
    return flat


def read_run_config(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """Parse and validate a run config against ``parser``; returns dest -> converted value."""
    if not path.is_file():
        raise UserError(f"--config_file: {path} not found")
    try:
        data = tomllib.loads(read_config_text(path))
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: not valid TOML: {err}") from None
    problems: list[str] = []
    actions = _actions(parser)
    known = [d for d in actions if d not in _NOT_IN_FILES]
    out: dict[str, Any] = {}
    for name, (value, section) in _flatten(data, path, problems).items():
        where = f"{path}: {section}: `{name}`"
        if name in _NOT_IN_FILES:
            problems.append(f"{where} cannot be set in a config file; give it on the command line")
            continue
        action = actions.get(name.replace("-", "_"))
        if action is None:
            hint = did_you_mean(name, known)
            problems.append(f"{where}: unknown option.{hint or ' Run the script with --help to list its options.'}")
            continue
        try:
            out[action.dest] = _convert(action, value)
        except ValueError as err:
            problems.append(f"{where}: {err}")
    if problems:
        raise UserError.from_problems(f"config file {path} is invalid", problems)
    return out


def _toml_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_toml_value(v) for v in value]
    if isinstance(value, list):
        return [_toml_value(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_run_config(parser: argparse.ArgumentParser, args: argparse.Namespace, path: Path) -> list[str]:
    """Write the non-default options of ``args`` (without secrets) as TOML; returns the keys written."""
    if path.exists():
        raise UserError(f"--output_config: {path} already exists; it is never overwritten. Delete it or give "
                        "another --config_file name")
    values: dict[str, Any] = {}
    for dest, action in _actions(parser).items():
        if dest in _NOT_IN_FILES or is_secret(dest) or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value is None or value == action.default:
            continue
        values[dest] = _toml_value(value)
    try:
        text = tomli_w.dumps(values)
    except TypeError as err:
        raise UserError(f"--output_config: cannot write an option as TOML: {err}") from None
    atomic_write_text(path, text)
    return list(values)


def load_run_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with ``--config_file`` applied (command line wins); handle ``--output_config``.

    With ``--output_config`` the effective options are written to the --config_file path (never
    overwriting a file) and ``SystemExit(0)`` is raised.
    """
    args = parser.parse_args(argv)
    config_file = getattr(args, "config_file", None)
    if getattr(args, "output_config", False):
        if not config_file:
            raise UserError("--output_config needs --config_file PATH: the file to write the options to")
        path = config_path(config_file)
        written = write_run_config(parser, args, path)
        print(f"wrote {len(written)} option(s) to {path}")
        raise SystemExit(0)
    if not config_file:
        return args
    values = read_run_config(parser, config_path(config_file))
    return parser.parse_args(argv, namespace=argparse.Namespace(**values))
