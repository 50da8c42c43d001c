"""The Dar et al. (arXiv 2402.01054) baseline: a ResNet-50 with a one-channel stem and a 128-d
output, trained self-supervised with NT-Xent (temperature 0.07) between an image and an
augmented view of it (small rotation, flips; trained by :mod:`deepssim.training.dar`). Its
similarity is the Pearson correlation of two embeddings (``DarMetric`` below).

Checkpoints follow ours: ``NAME.safetensors`` + ``NAME.json``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from deepssim.errors import DeepSSIMError
from deepssim.io.checkpoints import load_checkpoint, save_checkpoint
from deepssim.io.normalise import zscore_batch
from deepssim.metrics.base import TorchEmbeddingMetric, register, require_argument

DAR_FORMAT = "deepssim-dar-checkpoint"


@register("dar")
class DarMetric(TorchEmbeddingMetric):
    """Dar et al. (2024): a ResNet-50 with a one-channel stem and a 128-d output, trained by
    ``deepssim train-dar``; the similarity is the Pearson correlation of two embeddings."""

    thresholds = (0.8030425, 0.8030425)
    description = "Dar et al.: ResNet-50 NT-Xent embedding, Pearson correlation"
    centre = True

    @classmethod
    def from_argument(cls, argument, device="cpu", default_model=None):
        require_argument("dar", argument, "dar=runs/dar/dar.safetensors")
        return cls.from_file(argument, device)

    @classmethod
    def from_file(cls, path: str | Path, device: str = "cpu") -> DarMetric:
        return cls(load_dar(path), str(path), device)

    def prepare(self, batch):
        return zscore_batch(batch)


class DarNetwork(nn.Module):
    """torchvision ResNet-50, conv1 taking one channel, fc mapping 2048 -> 128."""

    def __init__(self, embedding_dim: int = 128):
        super().__init__()
        from torchvision.models import resnet50

        self.backbone = resnet50(weights=None)
        self.backbone.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.backbone.fc = nn.Linear(2048, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy over a batch of positive pairs."""
    embeddings = F.normalize(torch.cat([first, second]), dim=1)
    logits = embeddings @ embeddings.T / temperature
    logits.fill_diagonal_(float("-inf"))
    count = len(first)
    targets = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(logits.device)
    return F.cross_entropy(logits, targets)


def save_dar(network: DarNetwork, path: str | Path, training: dict) -> Path:
    config = {
        "format": DAR_FORMAT,
        "format_version": 1,
        "architecture": "dar_resnet50",
        "embedding_dim": 128,
        "similarity": "Pearson correlation of embeddings",
        "training": training,
    }
    return save_checkpoint(network.state_dict(), config, path)


def load_dar(path: str | Path) -> DarNetwork:
    state, config, weights_path = load_checkpoint(path, DAR_FORMAT, "a Dar checkpoint (`deepssim train-dar`)")
    network = DarNetwork(int(config.get("embedding_dim", 128)))
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise DeepSSIMError(
            f"{weights_path}: cannot load the Dar weights ({str(error).splitlines()[0]})"
        ) from None
    return network
