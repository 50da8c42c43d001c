"""Top-k search on embeddings: exact blocked matrix products (torch), or a FAISS index for large
sets (exact, or HNSW approximate). None holds the full N x M score matrix.

The search-backend registry (``SEARCH_BACKENDS``): name -> function(queries, database, k,
block_bytes) -> (scores, indices). A new backend is one function with
``@SEARCH_BACKENDS.register("name")``.
"""

from __future__ import annotations

import numpy as np
import torch

from deepssim.errors import DeepSSIMError
from deepssim.extras import require
from deepssim.registry import Registry

DEFAULT_BLOCK_BYTES = 256 * 2**20
SEARCH_BACKENDS = Registry("search method")


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
    backend = SEARCH_BACKENDS[method]
    k = min(k, len(database))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    database = np.ascontiguousarray(database, dtype=np.float32)
    return backend(queries, database, k, block_bytes)


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


@SEARCH_BACKENDS.register("exact")
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


@SEARCH_BACKENDS.register("faiss")
def _top_k_faiss_flat(queries, database, k, block_bytes=DEFAULT_BLOCK_BYTES):
    return _top_k_faiss(queries, database, k, approximate=False)


@SEARCH_BACKENDS.register("faiss-hnsw")
def _top_k_faiss_hnsw(queries, database, k, block_bytes=DEFAULT_BLOCK_BYTES):
    return _top_k_faiss(queries, database, k, approximate=True)
