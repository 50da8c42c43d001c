"""Where the heavy work runs: embedding, top-k search and blocks of exact SSIM work.

One registry (``ENGINES``): ``local`` runs everything in this process (the default);
``ray`` (:mod:`deepssim.execution.ray_engine`, registered lazily) runs the same work on a Ray
cluster. The scan's decisions, summary and report run on the driver either way, so both engines
write the same outputs. A new engine is one subclass of :class:`ScanEngine` with
``@ENGINES.register("name")``; its command-line options are its own (``add_options`` /
``from_options``).

This layer knows nothing of metrics or scans: an embedder is any object with
``embed(images, batch_size, precision)`` and ``fingerprint``; a block task is any function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from deepssim.execution.search import top_k_embeddings
from deepssim.io.cache import EmbeddingCache, default_cache_path, image_fingerprints
from deepssim.io.load import ImageSet
from deepssim.progress import progress_bar
from deepssim.registry import Registry

ENGINES: Registry[type[ScanEngine]] = Registry("engine")

Embed = Callable[[ImageSet, str], np.ndarray]  # also has .prepare({role: ImageSet}): embed them all now


def get_engine(engine: str | ScanEngine = "local", **options) -> ScanEngine:
    """An engine object from its registry name and options (an engine object is returned as is)."""
    if isinstance(engine, ScanEngine):
        return engine
    return ENGINES[engine](**options)


class ScanEngine:
    """The interface: embed image sets, search top-k both ways, run blocks of work."""

    name = ""

    @classmethod
    def add_options(cls, group) -> None:
        """Add this engine's command-line options to an argparse group (none by default)."""

    @classmethod
    def from_options(cls, options: dict, shard_dir: Path | None = None) -> ScanEngine:
        """The engine from the parsed options (a dict of every engine's options)."""
        return cls()

    def embedder(
        self, metric, *, cache=None, batch_size: int = 64, precision="float32", progress=False
    ) -> Embed:
        """A function ``embed(images, role)`` returning the L2-normalised embeddings of a set."""
        raise NotImplementedError

    def top_k(self, queries: np.ndarray, database: np.ndarray, k: int, method: str = "exact"):
        """(scores, indices) of each query's k best database rows, each (M, k), and each
        database row's best score over all queries, (N,)."""
        raise NotImplementedError

    def map(self, function: Callable, blocks: Sequence[tuple], *, sizes=None, description="", progress=False):
        """``[function(*block) for block in blocks]``, in order; ``sizes`` weigh the progress bar."""
        raise NotImplementedError

    def split(self, n: int, max_rows: int | None = None) -> list[tuple[int, int]]:
        """Row ranges, one task each (this process: one block of everything)."""
        return [(0, n)]

    def describe(self) -> dict:
        """What the audit trail records of this engine."""
        return {"engine": self.name}


@ENGINES.register("local")
class LocalEngine(ScanEngine):
    """This process: embeddings cached in SQLite by content, exact or FAISS search."""

    def embedder(self, metric, *, cache=None, batch_size=64, precision="float32", progress=False) -> Embed:
        store = None
        if cache is not None and cache is not False:
            path = default_cache_path() if cache is True else Path(cache)
            store = EmbeddingCache(path, f"{metric.fingerprint}:{precision}")
        return _CachedEmbedder(metric, store, batch_size, precision, progress)

    def top_k(self, queries, database, k, method="exact"):
        scores, indices = top_k_embeddings(queries, database, k, method)
        best_per_database = top_k_embeddings(database, queries, 1, method)[0][:, 0]
        return scores, indices, best_per_database

    def map(self, function, blocks, *, sizes=None, description="", progress=False):
        bar = block_progress(sizes, blocks, description, progress)
        out = []
        for n, block in enumerate(blocks):
            out.append(function(*block))
            bar.update(sizes[n] if sizes is not None else 1)
        bar.close()
        return out


ENGINES.register_lazy("ray", "deepssim.execution.ray_engine:RayEngine")  # Ray loads only when used


class _CachedEmbedder:
    """Embeds an ImageSet, taking what the cache has and storing the rest; each set once."""

    def __init__(self, metric, store: EmbeddingCache | None, batch_size, precision, progress):
        self.metric, self.store = metric, store
        self.batch_size, self.precision, self.progress = batch_size, precision, progress
        self.done: dict[int, np.ndarray] = {}  # the training set is embedded once, also for --reference

    def __call__(self, images: ImageSet, role: str) -> np.ndarray:
        if id(images) in self.done:
            return self.done[id(images)]
        store = self.store
        fingerprints = image_fingerprints(images) if store is not None else None
        found = store.get(fingerprints) if store is not None else {}
        missing = [i for i in range(len(images)) if fingerprints is None or fingerprints[i] not in found]
        out = None
        if found:
            out = np.empty((len(images), len(next(iter(found.values())))), dtype=np.float32)
            for i, fingerprint in enumerate(fingerprints):
                if fingerprint in found:
                    out[i] = found[fingerprint]
        chunk = self.batch_size * 8
        bar = progress_bar(len(missing), f"embedding {role} images", "img", self.progress and bool(missing))
        for start in range(0, len(missing), chunk):
            rows = missing[start : start + chunk]
            vectors = self.metric.embed(images.take(rows), self.batch_size, self.precision)
            if out is None:
                out = np.empty((len(images), vectors.shape[1]), dtype=np.float32)
            out[rows] = vectors
            if store is not None:
                store.put([fingerprints[i] for i in rows], vectors)
            bar.update(len(rows))
        bar.close()
        self.done[id(images)] = out
        return out

    def prepare(self, sets: dict[str, ImageSet]) -> None:
        """Embed every set now (an engine may do them together; here one after another)."""
        for role, images in sets.items():
            self(images, role)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def block_progress(sizes, blocks, description: str, progress: bool, unit: str = "pair"):
    """A progress bar over blocks of work, weighted by ``sizes`` when given."""
    total = int(sum(sizes)) if sizes is not None else len(blocks)
    return progress_bar(total, description, unit, progress)


def merge_top_k(parts: list[tuple[int, np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists: ``parts`` holds (row offset of the shard, scores, indices
    within the shard), each (M, k_shard); returns the overall (scores, indices), each (M, k)."""
    scores = np.concatenate([p[1] for p in parts], axis=1)
    indices = np.concatenate([p[2] + p[0] for p in parts], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(indices, order, axis=1)
