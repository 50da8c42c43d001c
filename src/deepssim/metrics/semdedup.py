"""SemDeDup (Abbas et al. 2023): semantic near-duplicates by CLIP image embeddings."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional as F

from deepssim.errors import DeepSSIMError
from deepssim.extras import require
from deepssim.io.normalise import unit_range
from deepssim.metrics.base import TorchEmbeddingMetric, register, require_argument, short_side


@register("semdedup")
class SemDeDupMetric(TorchEmbeddingMetric):
    """SemDeDup (Abbas et al. 2023): CLIP image embeddings (open_clip, weights from a local file),
    cosine; the shorter side resized to the model's input size and centre-cropped, CLIP
    normalisation, gray repeated to RGB."""

    thresholds = (0.97, 0.99905)
    description = "SemDeDup: CLIP image embeddings (open_clip), cosine"

    @classmethod
    def from_argument(cls, argument, device="cpu", default_model=None):
        require_argument("semdedup", argument, "semdedup=ViT-B-32:open_clip_weights.bin")
        return cls.from_spec(argument, device)

    @classmethod
    def from_spec(cls, spec: str, device: str = "cpu") -> SemDeDupMetric:
        open_clip = require("open_clip")

        if ":" not in spec:
            raise DeepSSIMError(
                f"semdedup needs ARCHITECTURE:WEIGHTS_FILE (e.g. ViT-B-32:open_clip.bin), got {spec!r}"
            )
        architecture, path = spec.split(":", 1)
        if not Path(path).is_file():
            raise DeepSSIMError(
                f"{path}: CLIP weights file not found (download it elsewhere; nothing is fetched)"
            )
        try:
            model = open_clip.create_model(architecture, pretrained=path, device=device)
        except RuntimeError as error:
            raise DeepSSIMError(
                f"{path}: not usable as {architecture} weights ({str(error).splitlines()[0]})"
            ) from None
        except Exception as error:  # noqa: BLE001 - unknown names and unreadable files
            raise DeepSSIMError(f"semdedup {spec}: cannot load ({type(error).__name__}: {error})") from None
        metric = cls(model, spec, device)
        config = open_clip.get_model_preprocess_cfg(model)
        size = config["size"]
        metric.size = (size, size) if isinstance(size, int) else tuple(size)
        metric.mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
        metric.std = torch.tensor(config["std"]).view(1, 3, 1, 1)
        return metric

    def forward(self, batch):
        return self.network.encode_image(batch)

    def prepare(self, batch):
        height, width = self.size
        resized = F.interpolate(
            unit_range(batch),
            size=short_side(batch.shape[-2:], min(height, width)),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        ).clamp(0, 1)
        top = (resized.shape[-2] - height) // 2
        left = (resized.shape[-1] - width) // 2
        cropped = resized[..., top : top + height, left : left + width]
        return (cropped.expand(-1, 3, -1, -1) - self.mean) / self.std
