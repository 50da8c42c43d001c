"""Every similarity metric behind one interface, for ``scan``, ``calibrate`` and ``evaluate``.

A metric scores a (training, generated) pair; higher is more similar. Two kinds:

- pixel metrics (``ssim``, ``fsim``) score matched pairs of same-sized images;
- embedding metrics (``deepssim``, ``sscd``, ``dar``, ``semdedup``) embed each image once into
  vectors whose inner product is the score, so a scan is a nearest-neighbour search.

Metrics are named on the command line as ``NAME`` or ``NAME=FILE``:
``deepssim[=MODEL]``, ``ssim``, ``fsim``, ``sscd=sscd_disc_mixup.torchscript.pt``,
``dar=runs/dar/dar.safetensors``, ``semdedup=ViT-B-32:open_clip_weights.bin``.
Pretrained weights are never downloaded: they are read from files the user has.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from deepssim.errors import DeepSSIMError
from deepssim.model import DeepSSIM
from deepssim.ssim import ssim_pairs

METRIC_NAMES = ("deepssim", "ssim", "fsim", "sscd", "dar", "semdedup")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SimilarityMetric:
    """Base class. ``thresholds``: the paper's (low, high), or None where the paper gives none.
    A single threshold t (Dar et al.) is (t, t): Duplicate above, Different at or below."""

    name = "metric"
    thresholds: tuple[float, float] | None = None
    is_embedding = False
    description = ""

    def pair_scores(self, real: np.ndarray, synthetic: np.ndarray) -> np.ndarray:
        """Scores of matched pairs (real[i], synthetic[i])."""
        if self.is_embedding:
            return np.sum(self.embed(real) * self.embed(synthetic), axis=1)
        raise NotImplementedError

    def embed(self, images, batch_size: int = 64, precision: str = "float32", progress: bool = False):
        raise DeepSSIMError(f"{self.name} is a pixel metric and has no embeddings")

    @property
    def fingerprint(self) -> str:
        return self.name


class SSIMMetric(SimilarityMetric):
    name = "ssim"
    thresholds = (0.6, 0.85)
    description = "SSIM (scikit-image defaults, z-scored images, data range of the training image)"

    def pair_scores(self, real, synthetic):
        return ssim_pairs(real, synthetic)


class FSIMMetric(SimilarityMetric):
    """The published FSIM (Zhang et al. 2011): phase congruency (log-Gabor filters, 4 scales x 4
    orientations) and gradient magnitude, as implemented by ``piq`` after the authors' MATLAB
    code; grayscale (FSIM, not FSIMc). Each image is min-max scaled to [0, 1] first."""

    name = "fsim"
    thresholds = None  # the paper gives no FSIM thresholds: calibrate them
    description = "FSIM, Zhang et al. 2011, with phase congruency (piq implementation)"

    def pair_scores(self, real, synthetic, batch_size: int = 64):
        import piq

        real, synthetic = np.asarray(real, dtype=np.float64), np.asarray(synthetic, dtype=np.float64)
        if real.shape != synthetic.shape:
            raise DeepSSIMError(
                f"FSIM needs pairs of one size; got {real.shape[1:]} and {synthetic.shape[1:]}"
            )
        scores = []
        for start in range(0, len(real), batch_size):
            a = _unit_range(real[start : start + batch_size])
            b = _unit_range(synthetic[start : start + batch_size])
            scores.append(piq.fsim(a, b, data_range=1.0, reduction="none", chromatic=False).numpy())
        return np.concatenate(scores).astype(np.float64)


class DeepSSIMMetric(SimilarityMetric):
    name = "deepssim"
    is_embedding = True
    description = "DeepSSIM: cosine of the learned embeddings"

    def __init__(self, model: str | Path | DeepSSIM = "default", device: str = "cpu"):
        self.model = model if isinstance(model, DeepSSIM) else DeepSSIM.load(model, device)
        self.thresholds = self.model.thresholds
        self.source = self.model.name

    def embed(self, images, batch_size=64, precision="float32", progress=False):
        return self.model.embed(images, batch_size, precision, progress)

    @property
    def fingerprint(self) -> str:
        return f"deepssim:{self.model.fingerprint}"


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
        from deepssim.model import _batches

        outputs = []
        for batch in _batches(images, batch_size):
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


class SSCDMetric(TorchEmbeddingMetric):
    """SSCD (Pizzi et al. 2022) from the user's TorchScript file: the shorter side resized to 288,
    gray repeated to RGB, ImageNet normalisation, cosine of the (L2-normalised) descriptors."""

    name = "sscd"
    thresholds = (0.4, 0.6)
    description = "SSCD copy-detection descriptor (TorchScript), cosine"
    resize = 288

    @classmethod
    def from_file(cls, path: str | Path, device: str = "cpu") -> SSCDMetric:
        return cls(_load_torchscript(path, device, "SSCD"), str(path), device)

    def prepare(self, batch):
        batch = F.interpolate(
            _unit_range(batch),
            size=_short_side(batch.shape[-2:], self.resize),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (batch.expand(-1, 3, -1, -1) - mean) / std


class DarMetric(TorchEmbeddingMetric):
    """Dar et al. (2024): a ResNet-50 with a one-channel stem and a 128-d output, trained by
    ``deepssim train-dar``; the similarity is the Pearson correlation of two embeddings."""

    name = "dar"
    thresholds = (0.8030425, 0.8030425)
    description = "Dar et al.: ResNet-50 NT-Xent embedding, Pearson correlation"
    centre = True

    @classmethod
    def from_file(cls, path: str | Path, device: str = "cpu") -> DarMetric:
        from deepssim.dar import load_dar

        return cls(load_dar(path), str(path), device)

    def prepare(self, batch):
        from deepssim.augment import zscore_batch

        return zscore_batch(batch)


class SemDeDupMetric(TorchEmbeddingMetric):
    """SemDeDup (Abbas et al. 2023): CLIP image embeddings (open_clip, weights from a local file),
    cosine; the shorter side resized to the model's input size and centre-cropped, CLIP
    normalisation, gray repeated to RGB."""

    name = "semdedup"
    thresholds = (0.97, 0.99905)
    description = "SemDeDup: CLIP image embeddings (open_clip), cosine"

    @classmethod
    def from_spec(cls, spec: str, device: str = "cpu") -> SemDeDupMetric:
        import open_clip

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
            _unit_range(batch),
            size=_short_side(batch.shape[-2:], min(height, width)),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        ).clamp(0, 1)
        top = (resized.shape[-2] - height) // 2
        left = (resized.shape[-1] - width) // 2
        cropped = resized[..., top : top + height, left : left + width]
        return (cropped.expand(-1, 3, -1, -1) - self.mean) / self.std


def load_metric(spec: str, device: str = "cpu", default_model: str | Path | DeepSSIM = "default"):
    """A metric from ``NAME`` or ``NAME=FILE`` (see the module docstring)."""
    name, _, argument = spec.partition("=")
    if name == "deepssim":
        return DeepSSIMMetric(argument or default_model, device)
    if name == "ssim":
        return SSIMMetric()
    if name == "fsim":
        return FSIMMetric()
    if name in ("sscd", "dar", "semdedup") and not argument:
        example = {
            "sscd": "sscd=sscd_disc_mixup.torchscript.pt",
            "dar": "dar=runs/dar/dar.safetensors",
            "semdedup": "semdedup=ViT-B-32:open_clip_weights.bin",
        }[name]
        raise DeepSSIMError(f"metric {name} needs its weights file: {example}")
    if name == "sscd":
        return SSCDMetric.from_file(argument, device)
    if name == "dar":
        return DarMetric.from_file(argument, device)
    if name == "semdedup":
        return SemDeDupMetric.from_spec(argument, device)
    raise DeepSSIMError(f"unknown metric {name!r}; choose from {', '.join(METRIC_NAMES)}")


def _load_torchscript(path: str | Path, device: str, what: str) -> torch.nn.Module:
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


def _unit_range(images) -> torch.Tensor:
    """Min-max scale each image of a (B, [C,] H, W) batch to [0, 1]; adds the channel axis."""
    batch = torch.as_tensor(images, dtype=torch.float32)
    if batch.ndim == 3:
        batch = batch.unsqueeze(1)
    low = batch.amin(dim=(-2, -1), keepdim=True)
    high = batch.amax(dim=(-2, -1), keepdim=True)
    return (batch - low) / (high - low).clamp(min=1e-12)


def _short_side(shape, target: int) -> tuple[int, int]:
    height, width = int(shape[0]), int(shape[1])
    scale = target / min(height, width)
    return max(target, round(height * scale)), max(target, round(width * scale))
