"""The scan's retrieval stage: each generated image's top-k training images by a metric.

Embedding metrics are searched on their embeddings (exact, FAISS or HNSW) by an execution engine;
SSIM is searched exactly over every pair, streamed block by block. Neither holds the N x M matrix.
"""

from __future__ import annotations

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.execution.engines import ScanEngine, get_engine
from deepssim.metrics import SimilarityMetric
from deepssim.ssim.matrix import top_k_ssim_on


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
