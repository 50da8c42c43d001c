"""Fit the metric to the user's own training set: fine-tune a start model on self-supervised
pairs of the user's training images within a time budget, and keep it only if it is better.

The paper trains DeepSSIM on the generative model's own training set, so the metric knows that
anatomy, scanner and contrast; our users have that set in hand (the scan's ``--train``). A fit:

1. samples pairs from the training images (generated images, when given, only as unrelated
   partners) with the default recipe (``rigid`` augmentation), split by source file so the
   validation groups are images the fit never trains on;
2. turns the time budget into a number of epochs, from a timed probe of training steps on this
   machine (the count is recorded; ``epochs`` fixes it, which makes a fit deterministic for a
   seed);
3. fine-tunes with :func:`deepssim.training.train.train`, which also scores the start model on
   the same validation pairs (epoch 0) and keeps the best epoch, the start model included;
4. writes ``fitted.safetensors`` + ``.json`` and ``fit.json`` (start and fitted validation
   numbers, epochs, seconds). If fitting did not lower the validation error, ``fitted`` is the
   start model and ``fit.json`` says so.

Fits are cached under ``~/.cache/deepssim/fits/`` by the content of the training images, the
recipe and the start model, so a second scan of the same training set reuses the fit.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from deepssim.embedding.model import DeepSSIM
from deepssim.errors import DeepSSIMError
from deepssim.hardware import PRECISIONS, resolve_precision
from deepssim.io.cache import image_fingerprints
from deepssim.io.files import write_text_atomic
from deepssim.io.load import ImageSet, LoadOptions
from deepssim.settings import option
from deepssim.training.augment import augment_batch
from deepssim.training.train import TrainSettings, train

PROBE_STEPS = 3
PAIR_SECONDS_PER_PAIR = 0.004  # sampling and SSIM targets, measured on 2 cores (a cost estimate)


@dataclass(frozen=True)
class FitSettings:
    """A fit's recipe. minutes: the budget on this machine; epochs: fixed instead (deterministic)."""

    start: str = field(
        default="default", metadata=option("start model: default or a checkpoint", flag="--from")
    )
    minutes: float = field(default=10.0, metadata=option("time budget"))
    epochs: int | None = field(
        default=None, metadata=option("fixed number of epochs instead of the time budget")
    )
    n_pairs: int = field(default=4000, metadata=option("self-supervised pairs to sample"))
    batch_size: int = 64
    learning_rate: float = 3e-4
    augmentation: str = "rigid"
    precision: str = field(
        default="auto",
        metadata=option("auto: bfloat16 only where the hardware computes it natively", choices=PRECISIONS),
    )
    seed: int = field(default=0, metadata=option("seed of every random draw"))
    device: str = field(default="cpu", metadata=option("cpu or cuda"))

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise DeepSSIMError(f"--minutes must be positive, not {self.minutes}")
        if self.epochs is not None and self.epochs < 1:
            raise DeepSSIMError(f"--epochs must be at least 1, not {self.epochs}")
        if self.n_pairs < 8 or self.batch_size < 1:
            raise DeepSSIMError("a fit needs at least 8 pairs and a positive batch size")
        resolve_precision(self.precision, self.device)


@dataclass
class FitResult:
    model_path: Path
    report: dict
    cached: bool = False

    @property
    def improved(self) -> bool:
        return self.report["best_epoch"] > 0


def fit(
    train_images,
    out_dir: str | Path,
    *,
    generated=None,
    settings: FitSettings | None = None,
    options: LoadOptions | None = None,
    progress: bool = False,
) -> FitResult:
    """Fine-tune ``settings.start`` on the user's training images (see the module docstring)."""
    settings = settings or FitSettings()
    out_dir = Path(out_dir)
    image_set = ImageSet.coerce(train_images, options, progress, "indexing training images")
    generated_set = (
        ImageSet.coerce(generated, options, progress, "indexing generated images") if generated else None
    )
    if len({ref.path for ref in image_set.refs}) < 2:
        raise DeepSSIMError(
            "fitting needs training images from at least two files (volumes or images), so that some "
            "can be held out for validation"
        )
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = out_dir / "plan.json"  # the epoch count, so an interrupted fit resumes with the same one
    if settings.epochs is not None:
        epochs = settings.epochs
    elif plan.is_file() and json.loads(plan.read_text()).get("settings") == asdict(settings):
        epochs = json.loads(plan.read_text())["epochs"]
    else:
        epochs = _epochs_for_budget(image_set, settings)
        write_text_atomic(plan, json.dumps({"settings": asdict(settings), "epochs": epochs}) + "\n")
    recipe = TrainSettings(
        epochs=epochs,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        precision=settings.precision,
        augmentation=settings.augmentation,
        n_pairs=settings.n_pairs,
        seed=settings.seed,
        initial_weights=settings.start,
        device=settings.device,
    )
    run = train(image_set, out_dir / "run", recipe, generated=generated_set, progress=progress)
    log = run.log
    start_row, best = log[0], min(log, key=lambda r: (r["val_aligned_mse"] + r["val_misaligned_mse"]) / 2)
    report = {
        "start": settings.start,
        "settings": asdict(settings),
        "epochs": epochs,
        "best_epoch": int(best["epoch"]),
        "improved": best["epoch"] > 0,
        "validation": {
            "pairs": run.summary["val_pairs"],
            "start": {k: start_row[k] for k in start_row if k.startswith("val_")},
            "fitted": {k: best[k] for k in best if k.startswith("val_")},
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(run.best_checkpoint.with_suffix(suffix), out_dir / f"fitted{suffix}")
    write_text_atomic(out_dir / "fit.json", json.dumps(report, indent=2) + "\n")
    return FitResult(out_dir / "fitted.safetensors", report)


def cached_fit(
    train_images,
    *,
    generated=None,
    settings: FitSettings | None = None,
    options: LoadOptions | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> FitResult:
    """The fit of these training images with this recipe: from the cache, or made and cached."""
    settings = settings or FitSettings()
    image_set = ImageSet.coerce(train_images, options, progress, "indexing training images")
    generated_set = (
        ImageSet.coerce(generated, options, progress, "indexing generated images") if generated else None
    )
    digest = hashlib.sha256()
    for images in (image_set, generated_set):  # the generated images are pairs' partners: part of the key
        for fingerprint in sorted(image_fingerprints(images)) if images is not None else ["none"]:
            digest.update(fingerprint.encode())
    recipe = {k: v for k, v in asdict(settings).items() if k not in ("device", "minutes")}
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    digest.update(DeepSSIM.load(settings.start).fingerprint.encode())
    folder = Path(cache_dir or Path.home() / ".cache" / "deepssim" / "fits") / digest.hexdigest()[:24]
    if (folder / "fit.json").is_file() and (folder / "fitted.safetensors").is_file():
        report = json.loads((folder / "fit.json").read_text())
        return FitResult(folder / "fitted.safetensors", report, cached=True)
    result = fit(
        image_set, folder, generated=generated, settings=settings, options=options, progress=progress
    )
    return result


def describe(result: FitResult) -> str:
    """Start and fitted validation MAE side by side, in one line."""
    start, fitted = result.report["validation"]["start"], result.report["validation"]["fitted"]
    verdict = (
        f"fitted model kept (best epoch {result.report['best_epoch']})"
        if result.improved
        else "fitting did not help: the start model is kept"
    )
    return (
        f"fit on held-out training groups ({result.report['validation']['pairs']} pairs): MAE aligned "
        f"{start['val_aligned_mae']:.4f} -> {fitted['val_aligned_mae']:.4f}, misaligned "
        f"{start['val_misaligned_mae']:.4f} -> {fitted['val_misaligned_mae']:.4f}; {verdict}"
        + (" (cached)" if result.cached else "")
    )


def _epochs_for_budget(image_set: ImageSet, settings: FitSettings) -> int:
    """Epochs that fit the time budget on this machine, from timed training steps."""
    model = DeepSSIM.load(settings.start)
    network = model.network.train()
    height, width = image_set.shape
    precision = resolve_precision(settings.precision, settings.device)
    batch = torch.randn(settings.batch_size, 1, height, width)
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=0.0)
    timings = []
    for step in range(PROBE_STEPS + 1):
        began = time.perf_counter()
        views = torch.cat(
            [
                augment_batch(batch, settings.augmentation, step),
                augment_batch(batch, settings.augmentation, step + 1),
            ]
        )
        views = views.expand(-1, network.input_channels, -1, -1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            loss = network(views).float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        timings.append(time.perf_counter() - began)
    step_seconds = float(np.median(timings[1:]))
    train_pairs = 0.8 * settings.n_pairs
    epoch_seconds = math.ceil(train_pairs / settings.batch_size) * step_seconds * 1.25  # + validation
    budget = settings.minutes * 60 - settings.n_pairs * PAIR_SECONDS_PER_PAIR
    return max(1, int(budget // epoch_seconds))
