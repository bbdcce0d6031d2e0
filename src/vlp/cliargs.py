"""Command-line flags derived from a config dataclass, and the config back from parsed flags.

Each field of the dataclass is one ``--kebab-case`` flag: its type comes from the annotation
(``int``, ``float``, ``str``, ``X | None``; ``bool`` as ``--flag/--no-flag``; a tuple as
several values; a dict as a JSON object) and its default is the field's own, so a default
lives in one place and a new field is a new flag. The help text, the accepted values and the
help section a field opens are the field's metadata, written with `option`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from vlp.errors import ConfigError, require_extra

T = TypeVar("T")


# the ranges a numeric field may declare: (lowest, highest, lowest excluded, highest excluded,
# whole numbers only); every one also demands a finite number
RANGES: dict[str, tuple[float | None, float | None, bool, bool, bool]] = {
    "positive": (0, None, True, False, False),
    "non_negative": (0, None, False, False, False),
    "probability": (0, 1, False, False, False),
    "beta": (0, 1, False, True, False),
    "count": (0, None, False, False, True),  # 0, 1, 2, ...
    "positive_count": (1, None, False, False, True),  # 1, 2, ...
}


def option(default: Any = dataclasses.MISSING, help: str = "", *,
           factory: Callable[[], Any] | Any = dataclasses.MISSING,
           choices: Sequence[str] | None = None, metavar: str | tuple[str, ...] | None = None,
           section: str | None = None, valid: str | None = None) -> Any:
    """A dataclass field with its command-line documentation: ``help`` for its flag,
    ``choices`` the values the flag accepts, ``section`` a help heading opened at this field
    (the following fields belong to it until the next one), ``valid`` its range (a name in
    `RANGES`; `check_ranges` enforces it, None always allowed for an optional field)."""
    if valid is not None and valid not in RANGES:
        raise ValueError(f"valid={valid!r}: expected one of {sorted(RANGES)}")
    metadata = {"help": help, "choices": choices, "metavar": metavar, "section": section,
                "valid": valid}
    return dataclasses.field(default=default, default_factory=factory,
                             metadata={k: v for k, v in metadata.items() if v is not None})


# `--fast-decode`: one definition for every command that reads images for inference
FAST_DECODE_HELP = ("decode large JPEGs at a reduced scale (PIL draft mode) and resample only "
                    "the kept centre square: ~1.8x images/s per core, pixels differ from the "
                    "exact path by 0.5-1 of 255 levels on average (evaluation preprocessing "
                    "only; off: exact, as the reference libraries)")


def fast_decode_option() -> Any:
    """The ``fast_decode`` field of a config whose images are read for inference: its flag
    is ``--fast-decode`` / ``--no-fast-decode``, off by default, with the same help
    everywhere."""
    return option(False, FAST_DECODE_HELP)


@dataclasses.dataclass
class DecodeOptions:
    """The image-decoding flags of a command with no config dataclass of its own."""

    fast_decode: bool = fast_decode_option()


def add_decode_args(parser: argparse.ArgumentParser) -> None:
    """``--fast-decode`` (dest ``fast_decode``) on a command that reads images for inference."""
    add_config_args(parser, DecodeOptions)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser, cls: type, *,
                    exclude: Collection[str] = (), required: Collection[str] = (),
                    flags: Mapping[str, Sequence[str]] | None = None,
                    item_flags: Mapping[str, Sequence[str]] | None = None,
                    prefix: str = "") -> None:
    """Add one flag per field of the dataclass ``cls`` (its dest is ``prefix`` + the field
    name), but for ``exclude``. ``flags`` gives a field other option strings than
    ``--field-name`` (aliases included); ``item_flags`` adds one flag per item of a tuple field
    (``--beta1 X`` sets ``betas[0]``); ``required`` fields must be given. A ``prefix`` keeps
    two configs' fields of the same name apart on one parser."""
    flags, item_flags = dict(flags or {}), dict(item_flags or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = {*exclude, *required, *flags, *item_flags} - set(fields)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    hints = typing.get_type_hints(cls)
    group: Any = parser
    for name, f in fields.items():
        if "section" in f.metadata:
            group = parser.add_argument_group(f.metadata["section"])
        if name in exclude:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
            else f.default
        kwargs = _flag_kwargs(hints[name], f"{cls.__name__}.{name}")
        for key in ("choices", "metavar"):
            if key in f.metadata:
                kwargs[key] = f.metadata[key]
        text = f.metadata.get("help", "").replace("%", "%%")
        if default not in (None, "", {}) and name not in required:
            text += " (default: %(default)s)" if text else "default: %(default)s"
        action = group.add_argument(*flags.get(name, [flag_name(name)]), dest=prefix + name,
                                    default=default, required=name in required, help=text,
                                    **kwargs)
        action.nullable = _strip_none(hints[name]) is not hints[name]  # a file may say null
        for index, item in enumerate(item_flags.get(name, ())):
            group.add_argument(item, dest=prefix + name, action=_SetItem, index=index,
                               type=kwargs["type"], default=argparse.SUPPRESS,
                               metavar=item.lstrip("-").upper(),
                               help=f"item {index + 1} of {flag_name(name)}")


def config_from_args(cls: type[T], args: argparse.Namespace, prefix: str = "",
                     **values: Any) -> T:
    """An instance of the dataclass ``cls`` from the flags `add_config_args` added for it (the
    parsed values of its fields, under ``prefix``); ``values`` set the rest, or override."""
    hints = typing.get_type_hints(cls)
    parsed = vars(args)
    for f in dataclasses.fields(cls):
        if prefix + f.name in parsed and f.name not in values:
            value = parsed[prefix + f.name]
            if isinstance(value, list) and typing.get_origin(_strip_none(hints[f.name])) is tuple:
                value = tuple(value)
            values[f.name] = value
    return cls(**values)


def _strip_none(hint: Any) -> Any:
    """``X`` for ``X | None``; any other annotation unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return hint


def _flag_kwargs(hint: Any, where: str) -> dict[str, Any]:
    hint = _strip_none(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if hint in (int, float, str):
        return {"type": hint}
    if origin is tuple and args and args[0] in (int, float, str):
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": args[0], "nargs": "+"}
        if all(a is args[0] for a in args):
            return {"type": args[0], "nargs": len(args)}
    if hint is dict or origin is dict:
        return {"type": json_object, "metavar": "JSON"}
    raise TypeError(f"{where}: no command-line flag for a field of type {hint}")


def positive_int(text: str) -> int:
    """An integer >= 1 (an argparse ``type``: a batch size, a count of beams, a pixel size)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer >= 1")
    return value


def json_object(text: str) -> dict[str, Any]:
    """The dict a JSON object string holds (an argparse ``type``)."""
    example = """e.g. '{"text": {"layers": 2}}'"""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({error}); expected a "
                                         f"JSON object, {example}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is a JSON {type(value).__name__}; expected "
                                         f"a JSON object, {example}")
    return value


class _SetItem(argparse.Action):
    """One item of a tuple-valued dest: ``--beta1 X`` replaces ``betas[0]`` (the tuple's other
    items keep their default or their value from an earlier flag)."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, index: int,
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.index = index

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        items = list(getattr(namespace, self.dest))
        items[self.index] = values
        setattr(namespace, self.dest, tuple(items))


def range_error(value: Any, valid: str) -> str | None:
    """What is wrong with `value` for range `valid` (a `RANGES` name), None when nothing."""
    low, high, low_open, high_open, whole = RANGES[valid]
    if whole:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected an integer >= {low}"
    elif isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        return "expected a finite number" + _bounds(low, high, low_open, high_open)
    if (low is not None and (value < low or (low_open and value == low))) or \
            (high is not None and (value > high or (high_open and value == high))):
        return ("expected an integer" if whole else "expected a number") + _bounds(
            low, high, low_open, high_open)
    return None


def _bounds(low: Any, high: Any, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f" {'>' if low_open else '>='} {low}"
    return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_ranges(config: Any, where: str) -> None:
    """ConfigError naming the field (and its flag) whose value is outside the range it
    declares (`option(valid=...)`); tuple fields are checked item by item."""
    for f in dataclasses.fields(config):
        valid = f.metadata.get("valid")
        value = getattr(config, f.name)
        if valid is None or value is None:
            continue
        for item in (value if isinstance(value, tuple | list) else (value,)):
            problem = range_error(item, valid)
            if problem is not None:
                raise ConfigError(f"{where} {f.name}={value!r} ({flag_name(f.name)}): {problem}")


# ---------------------------------------------------------------------------------------------
# a command's flags from a file (`vlp train --config FILE`)


def read_json_or_yaml(path: str | os.PathLike[str], what: str, alternative: str) -> Any:
    """What a JSON file (or, with PyYAML installed, a ``.yaml``/``.yml`` file) holds; `what`
    names the kind of file in errors ("config": "config file not found") and `alternative`
    the JSON form a user without PyYAML can write instead."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() in (".yaml", ".yml"):
        yaml = require_extra("yaml", "yaml", f"{path}: a YAML {what} (or {alternative})")
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None


def read_config_file(path: str) -> dict[str, Any]:
    """The object a JSON file (or, with PyYAML installed, a ``.yaml``/``.yml`` file) holds."""
    data = read_json_or_yaml(path, "config", "the same keys as a JSON object")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected an object of option: value (the flags' names "
                          f"without '--'), got a {type(data).__name__}")
    return data


def apply_config_file(parser: argparse.ArgumentParser, path: str,
                      skip: Collection[str] = ()) -> None:
    """Make the values of the config file at ``path`` the defaults of ``parser``'s flags, so
    flags given on the command line override them. A key is a flag's name without ``--``
    (``max_steps`` or ``max-steps``); an unknown key, or a value the flag cannot take, is one
    ConfigError naming the file and the key. A flag the file sets is no longer required."""
    values = read_config_file(path)
    actions = {}
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs and action.dest not in skip and not isinstance(action, _SetItem | (
                argparse._HelpAction)):
            actions[longs[0][2:].replace("-", "_")] = action
    for key, value in values.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None:
            close = difflib.get_close_matches(str(key).replace("-", "_"), actions, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r}{hint}; expected the name of a "
                              f"{parser.prog} flag without '--' (see {parser.prog} --help)")
        problem = _file_value_error(action, value)
        if problem is not None:
            raise ConfigError(f"{path}: {key}={value!r}: {problem}")
        if isinstance(value, list) and action.nargs is not None:
            value = list(value)
        action.default = value
        action.required = False


def _file_value_error(action: argparse.Action, value: Any) -> str | None:
    """What stops ``action``'s flag from taking ``value`` read from a file; None when fine."""
    if value is None:
        return None if action.default is None or getattr(action, "nullable", False) \
            else "expected a value (this option has no 'none')"
    if isinstance(action, argparse.BooleanOptionalAction | argparse._StoreTrueAction |
                  argparse._StoreFalseAction):
        return None if isinstance(value, bool) else "expected true or false"
    if action.nargs not in (None, "?"):
        if not isinstance(value, list):
            return "expected a list"
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            return f"expected a list of {action.nargs} values"
        items = value
    else:
        items = [value]
    for item in items:
        problem = _item_error(action, item)
        if problem is not None:
            return problem
    return None


def _item_error(action: argparse.Action, item: Any) -> str | None:
    kind = action.type
    if kind is json_object:
        return None if isinstance(item, dict) else "expected an object"
    if kind is int and (isinstance(item, bool) or not isinstance(item, int)):
        return "expected an integer"
    if kind is float and (isinstance(item, bool) or not isinstance(item, int | float)):
        return "expected a number"
    if kind in (None, str) and not isinstance(item, str):
        return "expected a string"
    if kind not in (None, str, int, float):  # a checking type such as positive_int
        try:
            kind(str(item))
        except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
            return str(error) or "not a valid value"
    if action.choices is not None and item not in action.choices:
        return f"expected one of {list(action.choices)}"
    return None
