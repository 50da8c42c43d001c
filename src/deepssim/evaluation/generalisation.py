"""Leave-one-source-out: how well a score holds on sources (subjects, volumes, scanners) that its
model never saw.

A *source* is one subject or volume, or one collection of 2D slices. For each held-out source S,
labelled pairs are planted from S's own images, with the benchmark builder's recipe:

- Duplicate: an image of S and a mildly degraded copy of it (blur, noise, gamma);
- Similar: a slice of the same stack 2-6 slices away, a smooth deformation of up to 3 px plus
  mild degradation, or a blend with another image (weight 0.5-0.7 on S's image);
- Different: an image of S and an image of another subject, half at random and half the most
  SSIM-similar one (the hard negatives).

Every pair also carries its exact SSIM on the clean, aligned images (the regression target).
Each score is then measured on S, aligned and misaligned (the evaluation protocol's views):

- regression fidelity (scores that estimate SSIM): MAE, RMSE, Pearson against the SSIM label,
  and the mean signed error in each SSIM decile (the calibration curve);
- macro-F1 with thresholds calibrated for macro-F1 on the *other* sources' pairs;
- duplicate recall@1 and @5: a degraded copy of an image of S (misaligned) must retrieve its own
  image among all of S's images, its neighbouring slices included.

Scores are functions ``score(first, second) -> (n,)`` over matched pairs of raw images; a
ranking function ``rank(queries, gallery) -> (n, k)`` gives each query's gallery indices, best
first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from deepssim.io.normalise import zscore
from deepssim.labels import Label
from deepssim.scanning.decide import calibrate, classify
from deepssim.seeds import derived_seed
from deepssim.ssim.engine import ssim_matrix, ssim_pairs
from deepssim.training.pairs import deform, degrade

NEIGHBOUR_OFFSETS = (2, 3, 4, 5, 6)
COPY_STRENGTH = 0.3
DEFORMATION_PIXELS = 3.0
DECILES = np.linspace(0.0, 1.0, 11)


@dataclass
class Source:
    """The images of one source: raw (n, H, W), with each image's stack, slice and subject."""

    name: str
    images: np.ndarray
    stacks: list[str]
    slice_index: np.ndarray
    subjects: list[str]


@dataclass
class HeldOutPairs:
    """Labelled pairs planted from one source: first[i] is S's image, second[i] the other."""

    source: str
    first: np.ndarray
    second: np.ndarray
    labels: np.ndarray
    kinds: list[str]
    ssim: np.ndarray = field(default=None)


def plant_pairs(source: Source, others: list[Source], per_class: int, seed: int) -> HeldOutPairs:
    """Duplicate, Similar and Different pairs from ``source`` (see the module docstring)."""
    rng = np.random.default_rng(derived_seed(seed, 11, sum(map(ord, source.name))))
    pool = zscore(source.images.astype(np.float64))
    n = len(pool)
    position = {
        (s, int(i)): row for row, (s, i) in enumerate(zip(source.stacks, source.slice_index, strict=True))
    }
    strangers_images = (
        zscore(np.stack([o.images[r].astype(np.float64) for o in others for r in range(len(o.images))]))
        if others
        else np.zeros((0, *pool.shape[1:]))
    )
    first, second, labels, kinds = [], [], [], []

    def add(a, b, label, kind):
        first.append(a)
        second.append(b)
        labels.append(label)
        kinds.append(kind)

    for _ in range(per_class):
        row = int(rng.integers(n))
        add(
            pool[row],
            degrade(pool[row], int(rng.integers(2**62)), COPY_STRENGTH),
            Label.DUPLICATE,
            "degraded_copy",
        )
    for k in range(per_class):
        row = int(rng.integers(n))
        kind = ("neighbour_slice", "deformed", "blend")[k % 3]
        if kind == "neighbour_slice":
            options = [
                position.get((source.stacks[row], int(source.slice_index[row]) + d * sign))
                for d in NEIGHBOUR_OFFSETS
                for sign in (-1, 1)
            ]
            options = [o for o in options if o is not None]
            if source.slice_index[row] < 0 or not options:
                kind = "deformed"
            else:
                add(pool[row], pool[int(rng.choice(options))], Label.SIMILAR, kind)
                continue
        if kind == "deformed":
            moved = deform(pool[row], int(rng.integers(2**62)), DEFORMATION_PIXELS)
            add(pool[row], degrade(moved, int(rng.integers(2**62)), COPY_STRENGTH), Label.SIMILAR, kind)
        else:
            other = _other_subject_images(source, row, pool, strangers_images)
            partner = other[int(rng.integers(len(other)))]
            alpha = rng.uniform(0.5, 0.7)
            add(pool[row], alpha * pool[row] + (1 - alpha) * partner, Label.SIMILAR, kind)
    for k in range(per_class):
        row = int(rng.integers(n))
        other = _other_subject_images(source, row, pool, strangers_images)
        if k % 2 == 0:
            add(pool[row], other[int(rng.integers(len(other)))], Label.DIFFERENT, "other_subject_random")
        else:
            scores = ssim_matrix(pool[[row]], other)[0]
            add(pool[row], other[int(np.argmax(scores))], Label.DIFFERENT, "other_subject_nearest")
    pairs = HeldOutPairs(source.name, np.stack(first), np.stack(second), np.array(labels), kinds)
    pairs.ssim = ssim_pairs(pairs.first, pairs.second)
    return pairs


def _other_subject_images(source: Source, row: int, pool: np.ndarray, strangers: np.ndarray) -> np.ndarray:
    """Images of subjects other than that of ``row``: of the same source first, then of others."""
    same_source = [i for i, s in enumerate(source.subjects) if s != source.subjects[row]]
    parts = [pool[same_source]] if same_source else []
    if len(strangers):
        parts.append(strangers)
    return np.concatenate(parts)


def misaligned(pairs: HeldOutPairs, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation protocol's misaligned views of both sides (seeded, the same for every score)."""
    from deepssim.evaluation.protocol import misaligned_views

    return misaligned_views(pairs.first, seed), misaligned_views(pairs.second, seed + 1)


def regression(scores: np.ndarray, target: np.ndarray) -> dict:
    """MAE, RMSE, Pearson, and the mean signed error in each SSIM decile (NaN where empty)."""
    error = scores - target
    bins = np.clip(np.digitize(target, DECILES[1:-1]), 0, 9)
    signed = [float(error[bins == b].mean()) if np.any(bins == b) else float("nan") for b in range(10)]
    return {
        "mae": float(np.abs(error).mean()),
        "rmse": float(np.sqrt((error**2).mean())),
        "pearson": float(np.corrcoef(scores, target)[0, 1]) if scores.std() > 0 else 0.0,
        "signed_error_by_decile": signed,
    }


def macro_f1_held_out(
    scores: dict[str, np.ndarray], labels: dict[str, np.ndarray], held_out: str
) -> tuple[float, tuple[float, float]]:
    """Macro-F1 on ``held_out`` with thresholds calibrated on every other source's pairs."""
    from sklearn.metrics import f1_score

    calibration = [s for s in scores if s != held_out]
    thresholds, _ = calibrate(
        np.concatenate([scores[s] for s in calibration]), np.concatenate([labels[s] for s in calibration])
    )
    predicted = classify(scores[held_out], thresholds)
    present = sorted(set(labels[held_out].tolist()))
    f1 = f1_score(labels[held_out], predicted, labels=present, average="macro", zero_division=0)
    return float(f1), (thresholds.low, thresholds.high)


def duplicate_recall(
    source: Source,
    rank: Callable[[np.ndarray, np.ndarray], np.ndarray],
    queries: int,
    seed: int,
    depths: tuple[int, ...] = (1, 5),
) -> dict:
    """Recall@k (k in ``depths``) of degraded, misaligned copies of S's images among all of S's
    images (neighbouring slices included): the share whose own image is in the top k.

    rank(queries, gallery) -> (n, >= max(depths)) gallery indices of each query, best first.
    """
    from deepssim.evaluation.protocol import misaligned_views

    rng = np.random.default_rng(derived_seed(seed, 13, sum(map(ord, source.name))))
    gallery = zscore(source.images.astype(np.float64))
    rows = rng.choice(len(gallery), size=min(queries, len(gallery)), replace=False)
    copies = np.stack([degrade(gallery[r], int(rng.integers(2**62)), COPY_STRENGTH) for r in rows])
    ranked = rank(misaligned_views(copies, derived_seed(seed, 14)), gallery)
    return {f"recall_at_{k}": float(np.mean((ranked[:, :k] == rows[:, None]).any(axis=1))) for k in depths}
