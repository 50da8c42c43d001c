"""The product's own metric: the cosine of DeepSSIM embeddings."""

from __future__ import annotations

from pathlib import Path

from deepssim.embedding.model import DeepSSIM
from deepssim.metrics.base import SimilarityMetric, register


@register("deepssim")
class DeepSSIMMetric(SimilarityMetric):
    is_embedding = True
    description = "DeepSSIM: cosine of the learned embeddings"

    def __init__(self, model: str | Path | DeepSSIM = "default", device: str = "cpu"):
        self.model = model if isinstance(model, DeepSSIM) else DeepSSIM.load(model, device)
        self.thresholds = self.model.thresholds
        self.source = self.model.name

    @classmethod
    def from_argument(cls, argument, device="cpu", default_model=None):
        return cls(argument or default_model or "default", device)

    def embed(self, images, batch_size=64, precision="float32", progress=False):
        return self.model.embed(images, batch_size, precision, progress)

    @property
    def fingerprint(self) -> str:
        return f"deepssim:{self.model.fingerprint}"
