"""Training of the Dar et al. baseline (:mod:`deepssim.metrics.dar`): NT-Xent (temperature 0.07)
between an image and an augmented view of it (small rotation, flips)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from deepssim.errors import DeepSSIMError
from deepssim.extras import require
from deepssim.io.load import ImageSet, LoadOptions
from deepssim.io.normalise import zscore, zscore_batch
from deepssim.metrics.dar import DarNetwork, nt_xent, save_dar
from deepssim.progress import progress_iter
from deepssim.seeds import derived_seed
from deepssim.settings import option

ROTATION_DEGREES = 10.0


@dataclass
class DarSettings:
    epochs: int = field(default=20, metadata=option("training epochs"))
    batch_size: int = field(default=32, metadata=option("images per batch"))
    learning_rate: float = field(default=3e-4, metadata=option("learning rate", flag="--lr"))
    weight_decay: float = 1e-4
    temperature: float = 0.07
    precision: str = field(
        default="bfloat16", metadata=option("float32 or bfloat16", choices=("float32", "bfloat16"))
    )
    seed: int = field(default=0, metadata=option("seed of every random draw"))
    device: str = field(default="cpu", metadata=option("cpu or cuda"))

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise DeepSSIMError(
                f"--epochs must be at least 1 and --batch-size at least 2 (NT-Xent needs pairs), not "
                f"{self.epochs} and {self.batch_size}"
            )


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
        iterator = progress_iter(batches, f"Dar epoch {epoch + 1}/{settings.epochs}", "batch", progress)
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
