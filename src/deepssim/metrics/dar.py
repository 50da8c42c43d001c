"""The Dar et al. (arXiv 2402.01054) baseline: a ResNet-50 with a one-channel stem and a 128-d
output, trained self-supervised with NT-Xent (temperature 0.07) between an image and an
augmented view of it (small rotation, flips). Its similarity is the Pearson correlation of two
embeddings (``DarMetric`` below).

Checkpoints follow ours: ``NAME.safetensors`` + ``NAME.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from deepssim.errors import DeepSSIMError
from deepssim.extras import require
from deepssim.io.files import atomic_path, write_text_atomic
from deepssim.io.load import ImageSet, LoadOptions
from deepssim.io.normalise import zscore, zscore_batch
from deepssim.metrics.base import TorchEmbeddingMetric, register, require_argument
from deepssim.seeds import derived_seed

DAR_FORMAT = "deepssim-dar-checkpoint"
ROTATION_DEGREES = 10.0


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


@dataclass
class DarSettings:
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    temperature: float = 0.07
    precision: str = "bfloat16"
    seed: int = 0
    device: str = "cpu"


def _views(images: torch.Tensor, seed: int) -> torch.Tensor:
    K = require("kornia.augmentation")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        steps = [
            K.RandomHorizontalFlip(p=0.5),
            K.RandomVerticalFlip(p=0.5),
            K.RandomRotation(ROTATION_DEGREES, p=1.0),
        ]
        out = images
        for step in steps:
            out = step(out)
    return zscore_batch(out)


def train_dar(
    images,
    out_dir,
    settings: DarSettings | None = None,
    options: LoadOptions | None = None,
    progress: bool = False,
) -> Path:
    """Train the Dar et al. embedder on training images; returns the checkpoint path
    (``out_dir/dar.safetensors``: the weights after the last epoch; NT-Xent has no
    validation target to choose another)."""
    settings = settings or DarSettings()
    if settings.epochs < 1 or settings.batch_size < 2:
        raise DeepSSIMError("Dar training needs at least one epoch and batches of two or more images")
    image_set = ImageSet.coerce(images, options, progress)
    if len(image_set) < 2:
        raise DeepSSIMError("Dar training needs at least two images")
    pool = torch.from_numpy(zscore(image_set.read()).astype(np.float32)).unsqueeze(1)
    torch.manual_seed(settings.seed)
    network = DarNetwork().to(settings.device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    steps = math.ceil(len(pool) / settings.batch_size) * settings.epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    started = time.perf_counter()
    log = []
    out_dir = Path(out_dir)
    for epoch in range(settings.epochs):
        network.train()
        order = np.random.default_rng([settings.seed, epoch]).permutation(len(pool))
        losses = []
        batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
        batches = [b for b in batches if len(b) >= 2]
        iterator = batches
        if progress:
            from tqdm import tqdm

            iterator = tqdm(batches, desc=f"Dar epoch {epoch + 1}/{settings.epochs}", unit="batch")
        for step, rows in enumerate(iterator):
            batch = pool[rows].to(settings.device)
            seed = derived_seed(settings.seed, epoch, step)
            first, second = _views(batch, seed), _views(batch, seed + 1)
            with torch.autocast(
                batch.device.type, dtype=torch.bfloat16, enabled=settings.precision == "bfloat16"
            ):
                embeddings = network(torch.cat([first, second]).contiguous(memory_format=torch.channels_last))
            loss = nt_xent(*embeddings.float().chunk(2), settings.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        log.append({"epoch": epoch + 1, "nt_xent": float(np.mean(losses))})
        summary = {
            "settings": asdict(settings),
            "images": len(pool),
            "log": log,
            "training_seconds": round(time.perf_counter() - started, 1),
        }
        path = save_dar(network, out_dir / "dar", summary)  # the last epoch's weights
    return path


def save_dar(network: DarNetwork, path: str | Path, training: dict) -> Path:
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    with atomic_path(path, suffix=".safetensors") as temporary:
        save_file(state, str(temporary))
    config = {
        "format": DAR_FORMAT,
        "format_version": 1,
        "architecture": "dar_resnet50",
        "embedding_dim": 128,
        "similarity": "Pearson correlation of embeddings",
        "training": training,
    }
    write_text_atomic(path.with_suffix(".json"), json.dumps(config, indent=2) + "\n")
    return path


def load_dar(path: str | Path) -> DarNetwork:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).with_suffix(".safetensors")
    config_path = path.with_suffix(".json")
    if not path.is_file() or not config_path.is_file():
        raise DeepSSIMError(
            f"{path.with_suffix('')}: a Dar checkpoint needs .safetensors and .json (deepssim train-dar)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError:
        config = {}
    if not isinstance(config, dict) or config.get("format") != DAR_FORMAT:
        raise DeepSSIMError(f"{config_path}: not a Dar checkpoint written by `deepssim train-dar`")
    network = DarNetwork(int(config.get("embedding_dim", 128)))
    try:
        network.load_state_dict(load_file(path), strict=True)
    except (SafetensorError, OSError, RuntimeError) as error:
        raise DeepSSIMError(f"{path}: cannot load the Dar weights ({str(error).splitlines()[0]})") from None
    return network
