"""Similarity metrics behind one interface (``SimilarityMetric``) and one registry (``METRICS``).

Importing this package registers every built-in metric; ``load_metric("NAME[=ARGUMENT]")``
builds one by name.
"""

from deepssim.metrics import dar, deepssim_metric, pixel, semdedup, sscd  # noqa: F401 - registers them
from deepssim.metrics.base import METRICS, SimilarityMetric, load_metric, register

__all__ = ["METRICS", "SimilarityMetric", "load_metric", "register"]
