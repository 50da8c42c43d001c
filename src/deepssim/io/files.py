"""Atomic output: a file appears complete under its final name, or not at all.

CSV cells are made safe to open in a spreadsheet (OWASP's CSV-injection rule): a text cell that
begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading ``'``
(:func:`escape_cell`), so no spreadsheet runs it as a formula; :func:`unescape_cell` gives the
text back, so a key written this way reads back unchanged. Numbers (``-0.5``, ``-inf``) are left
as they are.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    ``suffix`` is kept on the temporary name for writers that insist on an extension.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp (and some writers) make 0600
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(  # a signed number as our writers print one: not a formula, left as it is
    r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)", re.IGNORECASE
)


def _needs_quote(text: str) -> bool:
    """Whether :func:`escape_cell` prefixes ``text``: a formula start that is not a number, or a
    quote before such text (so that a key that itself begins with ``'=`` survives the round trip)."""
    text = text.lstrip("'")
    return text.startswith(FORMULA_STARTS) and not (text[0] in "+-" and _NUMBER.fullmatch(text))


def escape_cell(value):
    """A CSV cell safe to open in a spreadsheet: ``'`` before text that a spreadsheet would read as
    a formula (it begins with ``= + - @``, a tab or a carriage return and is not a number such as
    ``-0.5``). Anything that is not a ``str`` (numbers, None) is returned unchanged."""
    if isinstance(value, str) and _needs_quote(value):
        return "'" + value
    return value


def unescape_cell(text: str) -> str:
    """The text :func:`escape_cell` was given: one leading ``'`` removed, only where escape_cell
    put it. Use it on every key read from a CSV file that this package may have written."""
    if isinstance(text, str) and text.startswith("'") and _needs_quote(text[1:]):
        return text[1:]
    return text


def write_rows_atomic(path: str | Path, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    """Write dictionaries as a CSV file (header from ``fieldnames`` or the first row), atomically.

    Text cells go through :func:`escape_cell`; read them back with :func:`unescape_cell`.
    """
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames or list(rows[0]))
    writer.writeheader()
    writer.writerows({name: escape_cell(value) for name, value in row.items()} for row in rows)
    write_text_atomic(path, buffer.getvalue())
