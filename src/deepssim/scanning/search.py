"""Nearest training images of every generated image: exact blocked top-k on embeddings (torch),
a FAISS index for large sets (exact, or HNSW approximate), and exact SSIM top-k streamed
block by block. None of them holds the full N x M score matrix.
"""

from __future__ import annotations

import numpy as np
import torch

from deepssim.errors import DeepSSIMError
from deepssim.extras import require
from deepssim.ssim.engine import ssim_blocks

DEFAULT_BLOCK_BYTES = 256 * 2**20


def top_k_embeddings(
    queries: np.ndarray,
    database: np.ndarray,
    k: int,
    method: str = "exact",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices), each (M, k): the k database rows of highest inner product per query.

    Embeddings are L2-normalised, so inner product = cosine. ``exact`` multiplies blocks of
    queries small enough that one block of scores fits in ``block_bytes``; ``faiss`` uses an
    exact flat inner-product index; ``faiss-hnsw`` an approximate HNSW graph (faster on
    millions of images, may miss a neighbour).
    """
    if method not in SEARCH_BACKENDS:
        raise DeepSSIMError(f"unknown search method {method!r}; choose one of {', '.join(SEARCH_BACKENDS)}")
    k = min(k, len(database))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    database = np.ascontiguousarray(database, dtype=np.float32)
    return SEARCH_BACKENDS[method](queries, database, k, block_bytes)


def top_k_other_groups(
    vectors: np.ndarray, groups: list[str], k: int, block_bytes: int = DEFAULT_BLOCK_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices), each (N, k): every row's k best rows of *other* groups by inner product
    (exact, blocked; rows of the same group are never returned)."""
    codes = np.unique(np.asarray(groups), return_inverse=True)[1]
    if codes.max(initial=0) == 0:
        raise DeepSSIMError(
            "all training images are in one group: there are no different patients to compare"
        )
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    k = min(k, int(len(vectors) - np.bincount(codes).max()))
    base = torch.from_numpy(vectors)
    code_tensor = torch.from_numpy(codes)
    rows_per_block = max(1, block_bytes // (4 * len(vectors)))
    scores = np.empty((len(vectors), k), dtype=np.float32)
    indices = np.empty((len(vectors), k), dtype=np.int64)
    for start in range(0, len(vectors), rows_per_block):
        block = base[start : start + rows_per_block] @ base.T
        same = code_tensor[start : start + len(block), None] == code_tensor[None, :]
        best = torch.topk(block.masked_fill(same, -torch.inf), k, dim=1)
        scores[start : start + len(block)] = best.values.numpy()
        indices[start : start + len(block)] = best.indices.numpy()
    return scores, indices


def _top_k_torch(queries, database, k, block_bytes=DEFAULT_BLOCK_BYTES):
    rows_per_block = max(1, block_bytes // (4 * len(database)))
    base = torch.from_numpy(database)
    scores = np.empty((len(queries), k), dtype=np.float32)
    indices = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), rows_per_block):
        block = torch.from_numpy(queries[start : start + rows_per_block]) @ base.T
        best = torch.topk(block, k, dim=1)
        scores[start : start + len(block)] = best.values.numpy()
        indices[start : start + len(block)] = best.indices.numpy()
    return scores, indices


def _top_k_faiss(queries, database, k, approximate: bool):
    faiss = require("faiss")

    if approximate:
        index = faiss.IndexHNSWFlat(database.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(64, 2 * k)
    else:
        index = faiss.IndexFlatIP(database.shape[1])
    index.add(database)
    scores, indices = index.search(queries, k)
    missing = indices < 0  # HNSW may return fewer than k neighbours
    scores[missing] = -np.inf
    indices[missing] = 0
    return scores, indices.astype(np.int64)


# The search-backend registry: name -> function(queries, database, k, block_bytes) -> (scores, indices).
SEARCH_BACKENDS = {
    "exact": _top_k_torch,
    "faiss": lambda queries, database, k, _: _top_k_faiss(queries, database, k, approximate=False),
    "faiss-hnsw": lambda queries, database, k, _: _top_k_faiss(queries, database, k, approximate=True),
}


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
    from deepssim.io.load import ImageSet
    from deepssim.scanning.engines import get_engine, merge_top_k

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
