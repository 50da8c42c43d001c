"""SSCD (Pizzi et al., CVPR 2022), cited by the paper as "Chen et al.": a copy-detection descriptor."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional as F

from deepssim.io.normalise import unit_range
from deepssim.metrics.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TorchEmbeddingMetric,
    load_torchscript,
    register,
    require_argument,
    short_side,
)


@register("sscd")
class SSCDMetric(TorchEmbeddingMetric):
    """SSCD (Pizzi et al. 2022) from the user's TorchScript file: the shorter side resized to 288,
    gray repeated to RGB, ImageNet normalisation, cosine of the (L2-normalised) descriptors."""

    thresholds = (0.4, 0.6)
    description = "SSCD copy-detection descriptor (TorchScript), cosine"
    resize = 288

    @classmethod
    def from_argument(cls, argument, device="cpu", default_model=None):
        require_argument("sscd", argument, "sscd=sscd_disc_mixup.torchscript.pt")
        return cls.from_file(argument, device)

    @classmethod
    def from_file(cls, path: str | Path, device: str = "cpu") -> SSCDMetric:
        return cls(load_torchscript(path, device, "SSCD"), str(path), device)

    def prepare(self, batch):
        batch = F.interpolate(
            unit_range(batch),
            size=short_side(batch.shape[-2:], self.resize),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (batch.expand(-1, 3, -1, -1) - mean) / std
