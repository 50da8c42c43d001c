"""What every settings dataclass shares: ``Literal`` fields checked once, when it is made, and
their allowed values offered to the command line."""

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
