"""Atomic output: a file appears complete under its final name, or not at all; so does a folder
(:func:`atomic_folder`: written under a temporary name beside it and renamed into place at the end).

CSV cells are made safe to open in a spreadsheet (OWASP's CSV-injection rule): a text cell that
begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading ``'``
(:func:`escape_cell`), so no spreadsheet runs it as a formula; :func:`unescape_cell` gives the
text back, so a key written this way reads back unchanged. Numbers (``-0.5``, ``-inf``) are left
as they are.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deepssim.errors import DeepSSIMError


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


# files that mark a folder as a scan's output: only such a folder is replaced with overwrite
SCAN_OUTPUT_MARKERS = ("summary.json", "results.csv")


def check_output_folder(
    path: str | Path, *, overwrite: bool = False, inputs=(), option: str = "--out", others=()
) -> None:
    """Raise :class:`DeepSSIMError` unless a folder can be written (whole) at ``path``, before any work.

    It must not be a file; it must not lie inside an input (``inputs``: files or folders) nor hold
    one, nor nest with ``others`` ((option, path) pairs of other outputs); an existing non-empty
    folder is refused unless ``overwrite``, and even then unless it holds a scan's output (a
    ``summary.json`` or ``results.csv``: ``--out ~ --overwrite`` must not replace a home folder);
    and a temporary folder must be creatable beside it (tried, then removed; no parent folder is
    created).
    """
    path = Path(path)
    where = f"{option} {path}"
    if path.exists() and not path.is_dir():
        raise DeepSSIMError(f"{where} is a file, not a folder; choose another {option}")
    resolved = path.resolve()
    for given in inputs:
        given_path = Path(given).resolve()
        if resolved == given_path or resolved.is_relative_to(given_path):
            raise DeepSSIMError(f"{where} is inside the input {given}; write outputs outside the inputs")
        if given_path.is_relative_to(resolved):
            raise DeepSSIMError(
                f"the input {given} is inside {where}, which is replaced whole; choose another {option}"
            )
    for other_option, other in others:
        other_path = Path(other).resolve()
        if (
            resolved == other_path
            or resolved.is_relative_to(other_path)
            or other_path.is_relative_to(resolved)
        ):
            raise DeepSSIMError(f"{where} and {other_option} {other} must not be inside one another")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise DeepSSIMError(
                f"{where} already exists and is not empty; pass --overwrite to replace it whole "
                "(overwrite=True in the API), or choose another folder"
            )
        if not any((path / name).is_file() for name in SCAN_OUTPUT_MARKERS):
            raise DeepSSIMError(
                f"{where} is not empty and holds no scan output (no {' or '.join(SCAN_OUTPUT_MARKERS)}); "
                "--overwrite replaces only a folder a scan wrote: choose another folder"
            )
    check_writable(path, option)


def check_writable(path: str | Path, option: str = "--out") -> None:
    """Raise :class:`DeepSSIMError` unless something can be created beside ``path``: a temporary
    folder is made in its nearest existing parent and removed again."""
    parent = Path(path).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DeepSSIMError(
            f"cannot write {option} {path}: {parent} is not a folder; choose another {option}"
        )
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".deepssim-check-"))
    except OSError as error:
        raise DeepSSIMError(
            f"cannot write {option} {path} ({error.strerror or error}); choose another {option}"
        ) from None


@contextmanager
def atomic_folder(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path``; when the block succeeds it becomes ``path``
    (an existing folder is replaced whole, only with ``overwrite``); when it fails, or is
    interrupted, the temporary folder is removed and ``path`` is left as it was."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise DeepSSIMError(f"{path} already exists and is not empty; pass overwrite=True (--overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    try:
        yield partial
        os.chmod(partial, 0o777 & ~_umask())  # mkdtemp makes 0700
        _replace_folder(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _replace_folder(new: Path, path: Path) -> None:
    """Rename ``new`` to ``path``; an existing folder there is moved aside first, then deleted."""
    if not path.exists():
        os.rename(new, path)
        return
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
    os.rename(path, old / path.name)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old / path.name, path)  # put the previous folder back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
