"""An on-disk cache of embeddings, keyed by image content and model, so a rerun, an interrupted
run or a run with more generated images embeds only what is new.

One SQLite file; each row is (model fingerprint, image fingerprint) -> float32 vector. The
image fingerprint is the SHA-256 of the file's bytes, the image's index inside the file and
the loading options, so renaming or moving a file keeps its entry and editing it does not.
Rows are committed after every batch.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import asdict
from pathlib import Path

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.io.load import ImageSet


def default_cache_path() -> Path:
    import os

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "deepssim" / "embeddings.sqlite"


def image_fingerprints(images: ImageSet) -> list[str]:
    """A content fingerprint for every image of the set (each file is read once)."""
    options = json.dumps(asdict(images.options), sort_keys=True)
    by_file: dict[Path, str] = {}
    out = []
    for ref in images.refs:
        if ref.path not in by_file:
            digest = hashlib.sha256()
            with open(ref.path, "rb") as handle:
                for chunk in iter(lambda: handle.read(2**20), b""):
                    digest.update(chunk)
            by_file[ref.path] = digest.hexdigest()
        out.append(hashlib.sha256(f"{by_file[ref.path]}#{ref.index}#{options}".encode()).hexdigest())
    return out


class EmbeddingCache:
    def __init__(self, path: str | Path, model_fingerprint: str):
        self.path = Path(path)
        self.model = model_fingerprint
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.connection = sqlite3.connect(self.path)
            self.connection.execute(
                "CREATE TABLE IF NOT EXISTS embeddings "
                "(model TEXT, image TEXT, vector BLOB, PRIMARY KEY (model, image))"
            )
        except (OSError, sqlite3.Error) as error:
            raise DeepSSIMError(
                f"{self.path}: cannot open the embedding cache ({error}); pass another --cache or --no-cache"
            ) from None

    def get(self, fingerprints: list[str]) -> dict[str, np.ndarray]:
        found = {}
        for start in range(0, len(fingerprints), 500):
            part = fingerprints[start : start + 500]
            placeholders = ",".join("?" * len(part))
            rows = self.connection.execute(
                f"SELECT image, vector FROM embeddings WHERE model = ? AND image IN ({placeholders})",
                [self.model, *part],
            )
            found.update({image: np.frombuffer(vector, dtype=np.float32) for image, vector in rows})
        return found

    def put(self, fingerprints: list[str], vectors: np.ndarray) -> None:
        rows = [
            (self.model, f, np.asarray(v, dtype=np.float32).tobytes())
            for f, v in zip(fingerprints, vectors, strict=True)
        ]
        with self.connection:
            self.connection.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)", rows)

    def close(self) -> None:
        self.connection.close()
