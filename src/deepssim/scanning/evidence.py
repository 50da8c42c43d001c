"""The scan's evidence stage: for the gallery's pairs (the most similar, best first), the images,
the generated image moved into register, and the maps that show where the pair differs (absolute
difference, DeepSSIM similarity lost by integrated gradients, local SSIM). The report only draws
what this computes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deepssim.progress import progress_iter
from deepssim.ssim.registered import apply_transform


@dataclass
class GalleryPair:
    """One gallery pair: indices into the scan's generated and training images, the images, and
    maps as (label, values, colour map)."""

    generated_index: int
    train_index: int
    generated: np.ndarray
    train: np.ndarray
    aligned: np.ndarray
    maps: list[tuple[str, np.ndarray, str]]


def gallery_pairs(result, size: int = 24, progress: bool = False) -> list[GalleryPair]:
    """The evidence of the ``size`` generated images with the highest decision scores."""
    decided = np.nan_to_num(result.decision_scores[:, 0], nan=-np.inf)
    order = np.argsort(-decided, kind="stable")[:size]
    if len(order) == 0:
        return []
    generated = result.generated.take(order)
    training = result.train.take(result.neighbours[order, 0])
    pairs = []
    for i, fake, train in progress_iter(
        list(zip(order, generated, training, strict=True)), "report gallery", "pair", progress
    ):
        aligned = _aligned(result, int(i), fake)
        pairs.append(
            GalleryPair(
                int(i), int(result.neighbours[i, 0]), fake, train, aligned, _maps(result, train, aligned)
            )
        )
    return pairs


def _maps(result, train: np.ndarray, moved: np.ndarray) -> list[tuple[str, np.ndarray, str]]:
    """(label, map, colormap) of a pair: the difference, where similarity is lost, local SSIM."""
    if train.shape != moved.shape:
        return []
    za, zb = (train - train.mean()) / train.std(), (moved - moved.mean()) / moved.std()
    maps = [("difference", np.abs(za - zb), "magma")]
    model = result.embedder
    if model is not None:
        explanation = model.explain(train, moved, steps=16)
        maps.append(("similarity lost", np.clip(explanation.lost_similarity, 0, None), "magma"))
        maps.append(("local SSIM", explanation.ssim_map, "viridis"))
    return maps


def _aligned(result, i: int, image: np.ndarray) -> np.ndarray:
    """The generated image moved by the transform its registration found (itself without one)."""
    evidence = result.evidence
    if evidence is None or not evidence.has(i, 0):
        return image
    return apply_transform(image, **evidence.transform(i, 0))
