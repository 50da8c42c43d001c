"""The scan's retrieval stage: each generated image's top-k training images by a metric.

Embedding metrics are searched on their embeddings (exact, FAISS or HNSW) by an execution engine;
SSIM is searched exactly over every pair, streamed block by block. Neither holds the N x M matrix.
"""

from __future__ import annotations

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.execution.engines import ScanEngine, get_engine
from deepssim.metrics import SimilarityMetric
from deepssim.progress import progress_bar
from deepssim.ssim.matrix import top_k_ssim, top_k_ssim_on


def retrieve(
    metric: SimilarityMetric,
    train,
    generated,
    k: int,
    *,
    search: str = "exact",
    embed=None,
    engine: str | ScanEngine = "local",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, indices) of the ``k`` best training images of every generated image, each (M, k)
    best first, and every training image's best score over all generated images, (N,).

    ``embed(images, role)`` may supply cached embeddings (an engine's embedder).
    """
    engine = get_engine(engine)
    if metric.is_embedding:
        embed = embed or engine.embedder(metric, progress=progress)
        return engine.top_k(embed(generated, "generated"), embed(train, "training"), k, search)
    if metric.exhaustive_search:
        return top_k_ssim_on(engine, train, generated, k, progress=progress)
    raise DeepSSIMError(
        f"{metric.name} scores matched pairs only (use it in calibrate or evaluate); scan with "
        "deepssim, ssim or an embedding baseline"
    )


def exact_top_k(train, generated, k: int, *, chunk: int = 1024, progress: bool = False):
    """(scores, indices), each (M, k) best first: every generated image's k training images of
    highest exact SSIM, the generated image taken as it is and in its three flips (exact
    transforms that registration also tries), over every pair. The brute-force candidates no
    embedding can miss; the release filter's exact check.

    train, generated: :class:`ImageSet`s or (n, H, W) arrays of one image size."""
    k = min(k, len(train))
    scores = np.empty((len(generated), k), dtype=np.float32)
    indices = np.empty((len(generated), k), dtype=np.int64)
    read = generated.read if hasattr(generated, "read") else (lambda a, b: generated[a:b])
    bar = progress_bar(
        len(generated) * len(train) * 4, "exact SSIM of every pair (4 flips)", "pair", progress
    )
    for start in range(0, len(generated), chunk):
        images = read(start, min(start + chunk, len(generated)))
        flipped = np.concatenate([images, images[:, ::-1], images[:, :, ::-1], images[:, ::-1, ::-1]])
        block_scores, block_indices, _ = top_k_ssim(train, np.ascontiguousarray(flipped), k)
        n = len(images)
        # per generated image: its 4 flips' candidates, each training image once at its best score
        row_scores = block_scores.reshape(4, n, k).transpose(1, 0, 2).reshape(n, 4 * k)
        row_indices = block_indices.reshape(4, n, k).transpose(1, 0, 2).reshape(n, 4 * k)
        order = np.argsort(-row_scores, axis=1, kind="stable")
        for row in range(n):
            ranked = row_indices[row, order[row]]
            _, first = np.unique(ranked, return_index=True)
            best = np.sort(first)[:k]
            indices[start + row] = ranked[best]
            scores[start + row] = row_scores[row, order[row]][best]
        bar.update(n * len(train) * 4)
    bar.close()
    return scores, indices


def exact_candidates(train, generated, neighbours: np.ndarray, n: int, progress: bool = False) -> np.ndarray:
    """(M, n') training indices: each generated image's best training images by exact SSIM (in four
    flips, :func:`exact_top_k`) that its row of ``neighbours`` does not hold already, best first;
    n' = min(n, training images - k)."""
    k = neighbours.shape[1]
    n = min(n, len(train) - k)
    if n <= 0:
        return np.zeros((len(neighbours), 0), dtype=np.int64)
    _, exact = exact_top_k(train, generated, n + k, progress=progress)
    out = np.empty((len(neighbours), n), dtype=np.int64)
    for row, (found, known) in enumerate(zip(exact, neighbours, strict=True)):
        out[row] = found[~np.isin(found, known)][:n]
    return out
