"""The audit trail of a scan: enough for someone else to rerun it and check they got the same
inputs and model. Recorded in summary.json and shown in the report."""

from __future__ import annotations

import hashlib
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

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
