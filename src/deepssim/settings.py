"""What every settings dataclass shares: ``Literal`` fields checked once, when it is made, and
field metadata (:func:`option`) from which the command line generates its options, so each
setting's name, type, default, choices and help are written once."""

from __future__ import annotations

import typing
from dataclasses import fields
from typing import Literal

from deepssim.errors import DeepSSIMError


def check_literal_fields(settings) -> None:
    """Raise DeepSSIMError naming the field when a ``Literal`` field holds another value."""
    hints = typing.get_type_hints(type(settings))
    for field in fields(settings):
        allowed = literal_choices(hints[field.name])
        if allowed and getattr(settings, field.name) not in allowed:
            raise DeepSSIMError(
                f"{field.name} must be one of {', '.join(allowed)}, not {getattr(settings, field.name)!r}"
            )


def literal_choices(hint) -> tuple:
    """The values a ``Literal`` type hint allows (empty for any other hint)."""
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def choices(cls, name: str) -> tuple:
    """The allowed values of one Literal field of a settings class, for the CLI's ``choices``."""
    return literal_choices(typing.get_type_hints(cls)[name])


def option(
    help: str,
    *,
    flag: str | None = None,
    short: str | None = None,
    choices=None,
) -> dict:
    """Field metadata that makes a settings field a command-line option (the CLI generates it).

    flag: the long option (default ``--field-name``); short: e.g. ``-k``; choices: the allowed
    values, or a callable returning them (a registry), for fields that are not ``Literal``.

        k: int = field(default=5, metadata=option("matches kept", flag="--top-k", short="-k"))
    """
    return {"help": help, "flag": flag, "short": short, "choices": choices}


def allowed_values(cls, name: str) -> tuple:
    """The values a field allows: its ``Literal`` choices or its option's ``choices``."""
    literal = choices(cls, name)
    if literal:
        return literal
    given = next(field for field in fields(cls) if field.name == name).metadata.get("choices")
    return tuple(given() if callable(given) else given or ())


def whole_number(minimum: int, maximum: int | None = None, what: str = ""):
    """An argparse ``type`` for a whole number in [minimum, maximum]: a value outside is a one-line
    error naming the option, before any work (``--block-size -5`` is not a size)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            allowed = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise argparse.ArgumentTypeError(f"must be {allowed}{what}, not {value}")
        return value

    parse.__name__ = "whole number"
    return parse
