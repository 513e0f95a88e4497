"""A command line from a typed dataclass: one ``--flag`` per field, booleans as ``--x / --no-x``.

Used by ``python -m fastmae.finetune``; a field's ``metadata`` carries its ``help`` and optional
``choices`` / ``nargs``. Flags left unset stay out of the parsed namespace, so presets and config
files can sit between the defaults and the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, NoReturn

_TYPES = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "bool | None": bool,
    "float | None": float,
    "int | None": int,
    "str | None": str,
    "tuple[float, float]": float,
}


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line: ``prog: error: message``, exit 2.
    argparse prints the whole usage first, 30-odd lines for the trainer's fields, which buried the
    line that says what is wrong; ``--help`` still shows it."""

    last_error: str | None = None  # the message of the last refusal, for the other torchrun ranks

    def error(self, message: str) -> NoReturn:
        ArgumentParser.last_error = message
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def flag(name: str) -> str:
    """``embed_dim`` -> ``--embed-dim``."""
    return "--" + name.replace("_", "-")


def field_type(f: dataclasses.Field) -> type:
    """The scalar type argparse converts a field's values to."""
    return _TYPES[str(f.type)]


class AutoBool(argparse.Action):
    """The ``--x`` of a ``bool | None`` field: ``--x`` (on) and ``--x auto`` (None, the default's rule:
    what a resumed run or a config file set is set back); ``--no-x`` (off) is its own flag."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any):
        super().__init__(option_strings, dest, nargs="?", metavar="auto", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None):
        if values not in (None, "auto"):
            parser.error(f"{option_string} takes no value, or auto")
        setattr(namespace, self.dest, None if values == "auto" else True)


def _or_auto(kind: type) -> Any:
    """``kind``'s converter that reads ``auto`` as None (an optional field's default rule)."""

    def convert(text: str) -> Any:
        return None if text == "auto" else kind(text)

    convert.__name__ = kind.__name__  # argparse names it in "invalid float value"
    return convert


def add_field_argument(parser: argparse.ArgumentParser, f: dataclasses.Field, help_: str, choices: Any = None) -> None:
    """The flag of the dataclass field ``f``: booleans as ``--x / --no-x``, optional ones (``X | None``)
    also taking ``auto``, the value None stands for."""
    kind, optional = field_type(f), str(f.type).endswith("| None")
    if kind is bool and optional:
        parser.add_argument(flag(f.name), action=AutoBool, help=help_)
        parser.add_argument("--no-" + flag(f.name)[2:], dest=f.name, action="store_false", help="off")
        return
    if kind is bool:
        parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=help_)
        return
    metavar = None if choices else {int: "N", float: "X", str: "STR"}[kind] + ("|auto" if optional else "")
    parser.add_argument(
        flag(f.name), type=_or_auto(kind) if optional else kind, choices=choices, nargs=f.metadata.get("nargs"),
        metavar=metavar, help=help_,
    )  # fmt: skip


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per field of the dataclass ``cls``, its default shown in the help."""
    for f in dataclasses.fields(cls):
        shown = "auto" if f.default is None else f.default
        add_field_argument(parser, f, f"{f.metadata.get('help', '')} (default: {shown})", f.metadata.get("choices"))


def dataclass_parser(cls: type, prog: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    """An ``argparse`` parser for ``cls`` whose unset flags are absent from the namespace."""
    parser = ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    add_dataclass_arguments(parser, cls)
    return parser


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as JSON-ready values (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}
