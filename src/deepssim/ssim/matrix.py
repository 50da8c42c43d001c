"""Exact SSIM of every (train, generated) pair of two image sets: the full matrix saved with its
keys, or each generated image's top-k training images streamed block by block."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.execution.engines import get_engine, merge_top_k
from deepssim.io.files import atomic_path, write_text_atomic
from deepssim.io.load import ImageSet, LoadOptions
from deepssim.ssim.engine import ssim_blocks, ssim_matrix

FORMAT_VERSION = 1


@dataclass
class SimilarityMatrix:
    """An (N train, M generated) score matrix with the keys of its rows and columns."""

    values: np.ndarray
    train_keys: list[str]
    generated_keys: list[str]
    settings: dict = field(default_factory=dict)

    def top_k(self, k: int) -> list[tuple[str, int, str, float]]:
        """(generated_key, rank, train_key, score) for the k best train matches of each column."""
        k = min(k, len(self.train_keys))
        rows = []
        for j, generated_key in enumerate(self.generated_keys):
            column = np.asarray(self.values[:, j])
            best = np.argsort(-column, kind="stable")[:k]
            rows += [
                (generated_key, rank + 1, self.train_keys[i], float(column[i])) for rank, i in enumerate(best)
            ]
        return rows

    def save(self, path: str | Path) -> None:
        """Write one self-describing ``.npz`` (matrix, keys, settings as JSON), atomically."""
        with atomic_path(path, suffix=".npz") as temporary, open(temporary, "wb") as handle:
            np.savez(
                handle,
                ssim=self.values,
                train_keys=np.array(self.train_keys, dtype=str),
                generated_keys=np.array(self.generated_keys, dtype=str),
                settings=np.array(json.dumps(self.settings)),
            )

    def save_top_k(self, path: str | Path, k: int) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["generated_key", "rank", "train_key", "ssim"])
        writer.writerows((s, rank, r, f"{score:.6f}") for s, rank, r, score in self.top_k(k))
        write_text_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> SimilarityMatrix:
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(
                    values=data["ssim"],
                    train_keys=data["train_keys"].tolist(),
                    generated_keys=data["generated_keys"].tolist(),
                    settings=json.loads(str(data["settings"])),
                )
        except (OSError, KeyError, ValueError) as error:
            raise DeepSSIMError(f"{path}: not an SSIM matrix file written by deepssim ({error})") from None


def compute_ssim_matrix(
    train: str | Path | ImageSet,
    generated: str | Path | ImageSet,
    options: LoadOptions | None = None,
    dtype: str = "float32",
    backend: str = "auto",
    device: str = "cpu",
    block_size: int = 2048,
    progress: bool = False,
    matrix_file: str | Path | None = None,
    engine=None,
) -> SimilarityMatrix:
    """SSIM of every (train, generated) pair of two folders (or image sets).

    ``matrix_file``: a ``.npy`` path to hold the matrix on disk (memory-mapped) instead of in
    memory, for matrices larger than RAM. ``engine``: "local" (default) or a scan engine such as
    :class:`deepssim.execution.ray_engine.RayEngine`, which computes blocks of pairs as tasks.
    """
    if dtype not in ("float32", "float64"):
        raise DeepSSIMError(f"dtype must be float32 or float64, not {dtype!r}")
    train_set = ImageSet.coerce(train, options, progress, "indexing training images")
    generated_set = ImageSet.coerce(generated, options, progress, "indexing generated images")
    shape = (len(train_set), len(generated_set))
    if matrix_file is None:
        values = np.empty(shape, dtype=dtype)
    else:
        values = np.lib.format.open_memmap(matrix_file, mode="w+", dtype=dtype, shape=shape)
    engine = get_engine(engine or "local")
    train_ranges = engine.split(len(train_set))
    if len(train_ranges) == 1:  # one block: stream it here, reusing prepared images
        ssim_matrix(train_set, generated_set, np.dtype(dtype), backend, device, block_size, progress, values)
    else:
        corners = [(a, b, c) for a, b in train_ranges for c in range(0, shape[1], block_size)]
        blocks = [
            (
                train_set.subset(range(a, b)),
                generated_set.subset(range(c, min(c + block_size, shape[1]))),
                dtype,
            )
            for a, b, c in corners
        ]
        results = engine.map(
            _ssim_block,
            blocks,
            sizes=[len(t) * len(g) for t, g, _ in blocks],
            description="SSIM pairs",
            progress=progress,
        )
        for (a, b, c), block in zip(corners, results, strict=True):
            values[a:b, c : c + block.shape[1]] = block
    settings = {
        "format_version": FORMAT_VERSION,
        "metric": "ssim",
        "definition": "skimage structural_similarity defaults on per-image z-scored images, "
        "data_range = max - min of the z-scored training image",
        "dtype": dtype,
        "image_shape": list(train_set.shape),
        "load_options": asdict(train_set.options),
        "train_skipped": len(train_set.skipped),
        "generated_skipped": len(generated_set.skipped),
    }
    return SimilarityMatrix(values, train_set.keys, generated_set.keys, settings)


def _ssim_block(train: ImageSet, generated: ImageSet, dtype: str) -> np.ndarray:
    """One task of a distributed matrix: every pair of two blocks of images."""
    return ssim_matrix(train, generated, np.dtype(dtype))


def top_k_ssim(train, generated, k: int, block_size: int = 1024, progress: bool = False):
    """(scores, indices, best_per_training_image): the k training images of highest exact SSIM
    per generated image, each (M, k), merged block by block, and each training image's best
    score over all generated images, (N,). Training images are the "train" side of SSIM."""
    k = min(k, len(train))
    scores = np.full((len(generated), k), -np.inf, dtype=np.float32)
    indices = np.zeros((len(generated), k), dtype=np.int64)
    best_per_train = np.full(len(train), -np.inf, dtype=np.float32)
    for r0, s0, block in ssim_blocks(train, generated, np.float32, block_size=block_size, progress=progress):
        rows = slice(r0, r0 + block.shape[0])
        best_per_train[rows] = np.maximum(best_per_train[rows], block.max(axis=1))
        columns = slice(s0, s0 + block.shape[1])
        candidate_scores = np.concatenate([scores[columns], block.T], axis=1)
        candidate_indices = np.concatenate(
            [indices[columns], np.broadcast_to(np.arange(r0, r0 + block.shape[0]), block.T.shape)], axis=1
        )
        order = np.argsort(-candidate_scores, axis=1, kind="stable")[:, :k]
        scores[columns] = np.take_along_axis(candidate_scores, order, axis=1)
        indices[columns] = np.take_along_axis(candidate_indices, order, axis=1)
    return scores, indices, best_per_train


def top_k_ssim_on(engine, train, generated, k: int, progress: bool = False):
    """:func:`top_k_ssim` with the training images split into the engine's blocks (one task
    each, merged here); in this process when the engine makes one block."""
    engine = get_engine(engine or "local")
    ranges = engine.split(len(train))
    if len(ranges) == 1:
        return top_k_ssim(train, generated, k, progress=progress)
    part = (
        (lambda a, b: train.subset(range(a, b))) if isinstance(train, ImageSet) else (lambda a, b: train[a:b])
    )
    results = engine.map(
        top_k_ssim,
        [(part(a, b), generated, k) for a, b in ranges],
        sizes=[(b - a) * len(generated) for a, b in ranges],
        description="SSIM top-k",
        progress=progress,
    )
    scores, indices = merge_top_k(
        [(a, s, i) for (a, _), (s, i, _) in zip(ranges, results, strict=True)], min(k, len(train))
    )
    return scores, indices, np.concatenate([best for _, _, best in results])
