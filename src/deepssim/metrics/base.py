"""The metric interface and its registry: every similarity behind one API, for ``scan``,
``calibrate`` and ``evaluate``.

A metric scores a (training, generated) pair; higher is more similar. It does not search: the
scan's retrieval stage (:mod:`deepssim.scanning.retrieve`) does. Two kinds:

- pixel metrics (``ssim``, ``fsim``) score matched pairs of same-sized images;
- embedding metrics (``deepssim``, ``sscd``, ``dar``, ``semdedup``) embed each image once into
  vectors whose inner product is the score, so a scan is a nearest-neighbour search.

Metrics are named on the command line as ``NAME`` or ``NAME=ARGUMENT``:
``deepssim[=MODEL]``, ``ssim``, ``fsim``, ``sscd=sscd_disc_mixup.torchscript.pt``,
``dar=runs/dar/dar.safetensors``, ``semdedup=ViT-B-32:open_clip_weights.bin``.
Pretrained weights are never downloaded: they are read from files the user has.

A new metric is one module with a ``@register("name")`` class (``from_argument`` builds it
from the text after ``=``) plus its import in ``deepssim/metrics/__init__.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from deepssim.errors import DeepSSIMError
from deepssim.io.load import image_batches
from deepssim.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

METRICS: Registry[type[SimilarityMetric]] = Registry("metric")
register = METRICS.register  # class decorator: make a metric available as ``NAME[=ARGUMENT]``


class SimilarityMetric:
    """Base class. ``thresholds``: the paper's (low, high), or None where the paper gives none.
    A single threshold t (Dar et al.) is (t, t): Duplicate above, Different at or below."""

    name = "metric"
    thresholds: tuple[float, float] | None = None
    is_embedding = False
    exhaustive_search = False  # a pixel metric the scan can search over every pair (SSIM's kernel)
    description = ""

    def pair_scores(self, train: np.ndarray, generated: np.ndarray) -> np.ndarray:
        """Scores of matched pairs (train[i], generated[i])."""
        if self.is_embedding:
            return np.sum(self.embed(train) * self.embed(generated), axis=1)
        raise NotImplementedError

    def embed(self, images, batch_size: int = 64, precision: str = "float32", progress: bool = False):
        raise DeepSSIMError(f"{self.name} is a pixel metric and has no embeddings")

    @property
    def fingerprint(self) -> str:
        return self.name

    @classmethod
    def from_argument(cls, argument: str, device: str = "cpu", default_model=None) -> SimilarityMetric:
        """The metric from the text after ``NAME=`` (empty when none was given)."""
        return cls()


class TorchEmbeddingMetric(SimilarityMetric):
    """An embedding metric computed by a torch module from a prepared (B, C, H, W) batch."""

    is_embedding = True
    centre = False  # subtract each embedding's mean first (cosine becomes Pearson correlation)

    def __init__(self, network: torch.nn.Module, source: str, device: str = "cpu"):
        self.network = network.to(device).eval()
        self.device = torch.device(device)
        self.source = source

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) raw images -> the network's input."""
        raise NotImplementedError

    @torch.inference_mode()
    def embed(self, images, batch_size=64, precision="float32", progress=False):
        outputs = []
        for batch in image_batches(images, batch_size):
            tensor = torch.from_numpy(np.asarray(batch, dtype=np.float32)).unsqueeze(1)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                out = self.forward(self.prepare(tensor).to(self.device))
            outputs.append(out.float().cpu())
        vectors = torch.cat(outputs)
        if self.centre:
            vectors = vectors - vectors.mean(dim=1, keepdim=True)
        return F.normalize(vectors, dim=1).numpy()

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.network(batch)

    @property
    def fingerprint(self) -> str:
        import hashlib

        digest = hashlib.sha256(self.name.encode())
        path = Path(self.source.split(":")[-1])
        digest.update(path.read_bytes() if path.is_file() else self.source.encode())
        return digest.hexdigest()


def load_metric(spec: str, device: str = "cpu", default_model=None) -> SimilarityMetric:
    """A metric from ``NAME`` or ``NAME=ARGUMENT`` (see the module docstring)."""
    name, _, argument = spec.partition("=")
    return METRICS[name].from_argument(argument, device, default_model)


def require_argument(name: str, argument: str, example: str) -> None:
    if not argument:
        raise DeepSSIMError(f"metric {name} needs its weights file: {example}")


def load_torchscript(path: str | Path, device: str, what: str) -> torch.nn.Module:
    path = Path(path)
    if not path.is_file():
        raise DeepSSIMError(
            f"{path}: {what} TorchScript file not found (download it elsewhere; nothing is fetched)"
        )
    try:
        return torch.jit.load(str(path), map_location=device)
    except Exception:  # noqa: BLE001 - anything unreadable is the wrong file
        raise DeepSSIMError(
            f"{path}: not a TorchScript file; {what} needs its published TorchScript model"
        ) from None


def short_side(shape, target: int) -> tuple[int, int]:
    height, width = int(shape[0]), int(shape[1])
    scale = target / min(height, width)
    return max(target, round(height * scale)), max(target, round(width * scale))
