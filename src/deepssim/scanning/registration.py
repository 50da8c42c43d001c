"""The scan's registration stage: registered SSIM of the retrieved (training, generated) pairs,
one block of generated images per task of an execution engine."""

from __future__ import annotations

import numpy as np

from deepssim.execution.engines import ScanEngine, get_engine
from deepssim.io.load import ImageSet
from deepssim.ssim.registered import Registration, register_pairs


def register_top_k(
    train_set: ImageSet,
    generated_set: ImageSet,
    neighbours: np.ndarray,
    selected=None,
    progress=False,
    block=256,
    engine: str | ScanEngine = "local",
) -> Registration:
    """Registered SSIM of the (training image, generated image) pairs ``neighbours`` names, for
    the pairs ``selected`` (an (M, k) mask; default all), one block of generated images per task
    of the ``engine``."""
    engine = get_engine(engine)
    selected = np.ones(neighbours.shape, dtype=bool) if selected is None else np.asarray(selected)
    starts = [start for start in range(0, len(neighbours), block) if selected[start : start + block].any()]
    found = engine.map(
        _register_block,
        [(train_set, generated_set, neighbours[s : s + block], selected[s : s + block], s) for s in starts],
        sizes=[int(selected[s : s + block].sum()) for s in starts],
        description="registering top-k pairs",
        progress=progress,
    )
    evidence = Registration.empty(neighbours.shape)
    for rows, rank, result in found:
        for name in ("ssim_registered", "ssim_plain", "flip", "rotation_deg", "shift_px", "scale", "gamma"):
            getattr(evidence, name)[rows, rank] = getattr(result, name)
    return evidence


def _register_block(train_set: ImageSet, generated_set: ImageSet, neighbours, selected, start: int):
    """One task: register the selected pairs of generated images ``start:start + len(neighbours)``."""
    chosen, rank = np.nonzero(selected)
    generated = generated_set.read(start, start + len(neighbours))
    train_rows = neighbours[chosen, rank]
    needed = np.unique(train_rows)
    train_images = dict(zip(needed.tolist(), train_set.take(needed), strict=True))
    result = register_pairs(np.stack([train_images[i] for i in train_rows]), generated[chosen])
    return start + chosen, rank, result
