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


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per field of the dataclass ``cls``, its default shown in the help."""
    for f in dataclasses.fields(cls):
        kind = field_type(f)
        shown = "auto" if f.default is None else f.default
        help_ = f"{f.metadata.get('help', '')} (default: {shown})"
        if kind is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=help_)
            continue
        choices = f.metadata.get("choices")
        metavar = None if choices else {int: "N", float: "X", str: "STR"}[kind]
        parser.add_argument(
            flag(f.name), type=kind, choices=choices, nargs=f.metadata.get("nargs"), metavar=metavar, help=help_
        )


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
