"""The audit trail of a scan: enough for someone else to rerun it and check they got the same
inputs and model. Recorded in summary.json and shown in the report."""

from __future__ import annotations

import hashlib
import os
import secrets
import shlex
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path, PurePath

from deepssim._version import __version__
from deepssim.io.cache import image_fingerprints
from deepssim.io.load import ImageSet


def input_record(images: ImageSet) -> dict:
    """Where a set of images came from: its files, images and one content hash over them all
    (SHA-256 of every image's fingerprint: file content, index in the file and loading options)."""
    digest = hashlib.sha256()
    for fingerprint in sorted(image_fingerprints(images)):
        digest.update(fingerprint.encode())
    return {
        "files": len({ref.path for ref in images.refs}),
        "images": len(images),
        "skipped_images": len(images.skipped),
        "content_sha256": digest.hexdigest(),
    }


def audit_trail(inputs: dict[str, ImageSet], given: dict[str, object], model: dict, settings: dict) -> dict:
    """Tool version, date, command line, inputs, model and settings of one scan."""

    return {
        "tool": f"deepssim {__version__}",
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command_line": shlex.join(sys.argv) if sys.argv and sys.argv[0] else "(Python API)",
        "inputs": {
            role: {
                "given": [str(p) for p in _as_list(given.get(role))],
                "absolute": [str(Path(p).resolve()) for p in _as_list(given.get(role)) if p != "(ImageSet)"],
                **input_record(images),
            }
            for role, images in inputs.items()
        },
        "model": model,
        "settings": settings,
    }


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, ImageSet):
        return ["(ImageSet)"]
    return list(value) if isinstance(value, list | tuple) else [value]


WITHHELD = "(withheld)"


def anonymised_audit(audit: dict | None, withhold: tuple[str, ...] = ()) -> dict | None:
    """The audit trail without any absolute path: each input folder by its name only (with its
    counts and content hash), no ``absolute`` entries, and every absolute path in the command line,
    the model and the settings cut to its last part. ``withhold``: values (e.g. a ``--group-by``
    regex that may spell patient IDs) shown as ``(withheld)`` wherever they occur whole. What the
    anonymised report shows."""
    if not audit:
        return audit
    out = _strip_paths(audit, withhold)
    out["command_line"] = _strip_command_line(audit["command_line"], withhold)
    for record in out["inputs"].values():
        record.pop("absolute", None)
        record["given"] = [_last_part(p) for p in record["given"]]
    return out


def _last_part(text: str) -> str:
    """A path's last part (a folder's or file's name); other text as it is."""
    return PurePath(text).name or text


def _strip_paths(value, withhold: tuple[str, ...] = ()):
    """``value`` (nested dicts, lists, strings) with every absolute path replaced by its last part
    and every string in ``withhold`` by ``(withheld)``."""
    if isinstance(value, dict):
        return {key: _strip_paths(item, withhold) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strip_paths(item, withhold) for item in value]
    if isinstance(value, str) and value in withhold:
        return WITHHELD
    if isinstance(value, str) and os.path.isabs(value):
        return _last_part(value)
    return value


def _strip_command_line(command_line: str, withhold: tuple[str, ...] = ()) -> str:
    """The command line with every argument that is a path (absolute, or naming a file or folder
    that exists) cut to its last part; ``--option=PATH`` too."""
    if command_line == "(Python API)":
        return command_line
    try:
        words = shlex.split(command_line)
    except ValueError:
        return "(command line withheld)"
    out = []
    for word in words:
        option, equals, rest = word.partition("=") if word.startswith("--") else ("", "", word)
        if rest in withhold:
            rest = WITHHELD
        elif rest and (os.path.isabs(rest) or (("/" in rest or os.sep in rest) and os.path.exists(rest))):
            rest = _last_part(rest)
        out.append(option + equals + rest)
    return shlex.join(out)


def key_hasher(salt: str) -> Callable[[str], str]:
    """key -> ``h:`` and the first 16 hex digits of SHA-256(salt, key): the same key gives the same
    hash within a run (one salt); without the salt a key cannot be guessed from its hash."""

    def hashed(key: str) -> str:
        return "h:" + hashlib.sha256(f"{salt}\n{key}".encode()).hexdigest()[:16]

    return hashed


def new_salt() -> str:
    """A random salt for :func:`key_hasher` (256 bits, hex)."""
    return secrets.token_hex(32)
