"""Where heavy work runs, below the metrics and the scan: engines (this process, or a Ray
cluster), top-k search on embeddings, and merging of per-block results.

This package imports neither :mod:`deepssim.scanning` nor :mod:`deepssim.metrics` (a test
checks the layering), so every layer above may call it.
"""

from deepssim.execution.engines import ENGINES, LocalEngine, ScanEngine, get_engine, merge_top_k
from deepssim.execution.search import SEARCH_BACKENDS, top_k_embeddings, top_k_other_groups

__all__ = [
    "ENGINES",
    "SEARCH_BACKENDS",
    "LocalEngine",
    "ScanEngine",
    "get_engine",
    "merge_top_k",
    "top_k_embeddings",
    "top_k_other_groups",
]
