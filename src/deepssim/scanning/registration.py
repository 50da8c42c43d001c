"""The scan's registration stage: registered SSIM of the retrieved (training, generated) pairs,
one block of generated images per task of an execution engine.

``mode="cascade"`` (the scan's default) registers each generated image's pairs until one is a
Duplicate (:func:`deepssim.ssim.registered.register_cascade` states the rules) and needs the
thresholds; ``mode="full"`` registers every pair."""

from __future__ import annotations

import numpy as np
import torch

from deepssim.errors import DeepSSIMError
from deepssim.execution.engines import ScanEngine, get_engine
from deepssim.io.load import ImageSet
from deepssim.ssim.registered import (
    Registration,
    RegistrationSettings,
    TrainingImages,
    register_cascade,
    register_indexed,
)

MODES = ("cascade", "full")


def register_top_k(
    train_set: ImageSet,
    generated_set: ImageSet,
    neighbours: np.ndarray,
    selected=None,
    progress=False,
    block: int | None = None,
    engine: str | ScanEngine = "local",
    mode: str = "full",
    thresholds=None,
    device: str = "cpu",
) -> Registration:
    """Registered SSIM of the (training image, generated image) pairs ``neighbours`` names, for
    the pairs ``selected`` (an (M, k) mask; default all), one block of generated images per task
    of the ``engine``. ``mode``: "full" or "cascade"; the cascade needs ``thresholds`` (low, high)
    (a :class:`Thresholds` or a pair), the ones that will decide. ``device``: where the search and
    the candidates' exact SSIM run (a GPU takes larger blocks: ``block`` None is 256 generated
    images per task on the CPU, 2048 elsewhere)."""
    if mode not in MODES:
        raise DeepSSIMError(f"registration must be one of {', '.join(MODES)}, not {mode!r}")
    cascade = None
    if mode == "cascade":
        if thresholds is None:
            raise DeepSSIMError("the registration cascade needs the decision thresholds (low, high)")
        low, high = (thresholds.low, thresholds.high) if hasattr(thresholds, "low") else thresholds
        cascade = (float(low), float(high))
    engine = get_engine(engine)
    settings = RegistrationSettings(device=device)
    if block is None:
        block = 256 if torch.device(device).type == "cpu" else 2048
    selected = np.ones(neighbours.shape, dtype=bool) if selected is None else np.asarray(selected)
    starts = [start for start in range(0, len(neighbours), block) if selected[start : start + block].any()]
    # in this process, each training image read and prepared once
    training = TrainingImages(train_set, settings.device)
    found = engine.map(
        _register_block,
        [
            (
                training,
                generated_set,
                neighbours[s : s + block],
                selected[s : s + block],
                s,
                cascade,
                settings,
            )
            for s in starts
        ],
        sizes=[int(selected[s : s + block].sum()) for s in starts],
        description="registering top-k pairs",
        progress=progress,
    )
    evidence = Registration.empty(neighbours.shape)
    for rows, rank, result in found:
        for name in (*_FIELDS, "searched"):
            getattr(evidence, name)[rows, rank] = getattr(result, name)
    return evidence


_FIELDS = ("ssim_registered", "ssim_plain", "flip", "rotation_deg", "shift_px", "scale", "gamma")


def _register_block(
    training: TrainingImages,
    generated_set: ImageSet,
    neighbours,
    selected,
    start: int,
    cascade,
    settings: RegistrationSettings,
):
    """One task: register the selected pairs of generated images ``start:start + len(neighbours)``;
    ``cascade``: (low, high) for the cascade, None for every pair. The training images are read and
    prepared when first needed and kept for the next blocks (a Ray task gets its own)."""
    chosen, rank = np.nonzero(selected)
    generated = generated_set.read(start, start + len(neighbours))
    train_rows = neighbours[chosen, rank]
    if cascade is None:
        result = register_indexed(training, generated, train_rows, chosen, settings=settings)
    else:
        result = register_cascade(training, generated, train_rows, chosen, cascade, settings=settings)
    return start + chosen, rank, result
