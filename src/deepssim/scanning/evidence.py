"""The scan's evidence stage: for the gallery's pairs (the most similar, best first), the images,
the generated image moved into register, and the maps that show where the pair differs (absolute
difference, DeepSSIM similarity lost by integrated gradients, local SSIM). The report only draws
what this computes.

Its cost is bounded: the images and maps are drawn at most ``MAX_SIDE`` pixels on the longer side
(block means of the full-resolution image; the report shows them 160 pixels wide), so a pair of
2048 x 2048 images costs what a 256 x 256 pair does. Anonymised, a pair keeps no image at all,
only, for a Duplicate, a ``BLOCKS`` x ``BLOCKS`` grid of the mean absolute difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deepssim.labels import Label
from deepssim.progress import progress_iter
from deepssim.ssim.registered import apply_transform

MAX_SIDE = 256  # pixels on the longer side of every image and map in the gallery
BLOCKS = 8  # an anonymised map: this many blocks a side
ATTRIBUTION_STEPS = 8  # integrated-gradients steps (midpoint rule) per pair


@dataclass
class GalleryPair:
    """One gallery pair: indices into the scan's generated and training images, the images
    (downsampled; None when anonymised), and maps as (label, values, colour map)."""

    generated_index: int
    train_index: int
    generated: np.ndarray | None
    train: np.ndarray | None
    aligned: np.ndarray | None
    maps: list[tuple[str, np.ndarray, str]]


def gallery_pairs(
    result, size: int = 24, progress: bool = False, anonymise: bool = False
) -> list[GalleryPair]:
    """The evidence of the ``size`` generated images with the highest decision scores.

    anonymise: keep no image; a Duplicate gets only a coarse block map of the difference
    (:func:`block_difference`), any other pair no map."""
    decided = np.nan_to_num(result.decision_scores[:, 0], nan=-np.inf)
    order = np.argsort(-decided, kind="stable")[: max(size, 0)]
    if len(order) == 0:
        return []
    return _gallery_pairs(result, order, progress, anonymise)


def _gallery_pairs(result, order, progress: bool, anonymise: bool) -> list[GalleryPair]:
    pairs = []
    for i in progress_iter([int(i) for i in order], "report gallery", "pair", progress):
        j = int(result.neighbours[i, 0])
        fake = result.generated.take([i])[0]
        train = result.train.take([j])[0]
        aligned = _aligned(result, i, fake)
        if anonymise:
            duplicate = int(result.classes[i]) == Label.DUPLICATE
            maps = (
                [("mean |difference| per block", block_difference(train, aligned), "Reds")]
                if duplicate
                else []
            )
            pairs.append(GalleryPair(i, j, None, None, None, maps))
            continue
        fake, train, aligned = (downsample(image) for image in (fake, train, aligned))
        pairs.append(GalleryPair(i, j, fake, train, aligned, _maps(result, train, aligned)))
    return pairs


def downsample(image: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """``image`` reduced by whole-number block means until its longer side is at most ``max_side``
    (edges padded by repetition); unchanged when it already is."""
    factor = -(-max(image.shape) // max_side)
    if factor <= 1:
        return np.asarray(image, dtype=np.float64)
    height, width = (-(-side // factor) * factor for side in image.shape)
    padded = np.pad(image, ((0, height - image.shape[0]), (0, width - image.shape[1])), mode="edge")
    return padded.reshape(height // factor, factor, width // factor, factor).mean(axis=(1, 3))


def block_difference(train: np.ndarray, moved: np.ndarray, blocks: int = BLOCKS) -> np.ndarray:
    """A ``blocks`` x ``blocks`` grid of the mean absolute difference of the z-scored images:
    where a near-copy differs, with nothing of the anatomy (NaN-free; zeros when shapes differ)."""
    if train.shape != moved.shape:
        return np.zeros((blocks, blocks))
    za, zb = (train - train.mean()) / train.std(), (moved - moved.mean()) / moved.std()
    difference = np.abs(za - zb)
    rows = np.linspace(0, difference.shape[0], blocks + 1).astype(int)
    cols = np.linspace(0, difference.shape[1], blocks + 1).astype(int)
    sums = np.add.reduceat(np.add.reduceat(difference, rows[:-1], axis=0), cols[:-1], axis=1)
    return sums / np.outer(np.diff(rows), np.diff(cols))


def _maps(result, train: np.ndarray, moved: np.ndarray) -> list[tuple[str, np.ndarray, str]]:
    """(label, map, colormap) of a pair: the difference, where similarity is lost, local SSIM."""
    if train.shape != moved.shape:
        return []
    za, zb = (train - train.mean()) / train.std(), (moved - moved.mean()) / moved.std()
    maps = [("difference", np.abs(za - zb), "magma")]
    model = result.embedder
    if model is not None and min(train.shape) >= 7:  # local SSIM needs its 7x7 window
        precision = "bfloat16" if result.summary.precision == "bfloat16" else "float32"  # as the scan ran
        explanation = model.explain(train, moved, steps=ATTRIBUTION_STEPS, precision=precision)
        maps.append(("similarity lost", np.clip(explanation.lost_similarity, 0, None), "magma"))
        maps.append(("local SSIM", explanation.ssim_map, "viridis"))
    return maps


def _aligned(result, i: int, image: np.ndarray) -> np.ndarray:
    """The generated image moved by the transform its registration found (itself without one)."""
    evidence = result.evidence
    if evidence is None or not evidence.has(i, 0):
        return image
    return apply_transform(image, **evidence.transform(i, 0))
