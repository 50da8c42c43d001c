"""Registered SSIM's null (pairs of different subjects) and the decision at low resolution (issue 22).

    PYTHONPATH=src .venv/bin/python benchmarks/registration_null.py [--out build/registration_null]

Data: the bundled real sources (data/sources, the five sources of benchmarks/generalisation.py,
each brought to 128 px). Per source, the leave-one-source-out protocol's pairs are planted
(deepssim.evaluation.generalisation.plant_pairs, 30 per class, seed 0: degraded copies; neighbouring
slices, deformations and blends; other subjects at random and the most SSIM-similar one), plus up to 20
hard negatives (distinct images of the source): an image of the source and the other-subject image of highest plain SSIM over the
four flips. Every pair is then resized to 32, 64 and 256 px (area-averaged down, bilinear up), so
one content is measured at four resolutions. Misaligned views (the protocol's) at 64 and 128 px.

Registered SSIM is measured with the search restricted by RegistrationSettings, cumulatively:
none (plain SSIM) / +flip / +rotation / +shift / +scale (geometry, no contrast) / +gamma (the
default). The oracle check registers noisy misaligned copies (flip, rotation 6-10 deg, shift 5 px
at 128 scaled with the size, noise sigma 0.05-0.15 of the image's standard deviation) and compares
with the SSIM after the exact inverse transform (apply_transform, bicubic like the registration).

Decision rules are evaluated on those numbers (no new registration): (a) count a family only when
it gains more than a margin over the score without it; (b) search fewer families at low resolution;
(c) a high threshold raised to a null quantile fitted on the other sources; and a multi-scale score
(the registered pair's SSIM at full, 1/2 and 1/4 scale). Registrations are cached in --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from skimage.transform import resize

from deepssim.evaluation.generalisation import _other_subject_images, misaligned, plant_pairs
from deepssim.hardware import cpu_description
from deepssim.io.normalise import zscore
from deepssim.scanning.decide import DIFFERENT, DUPLICATE, SIMILAR
from deepssim.ssim.engine import ssim_matrix, ssim_pairs
from deepssim.ssim.registered import FLIPS, RegistrationSettings, apply_transform, register_pairs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from generalisation import bundled_sources  # noqa: E402

SIZES = (32, 64, 128, 256)
MISALIGNED_SIZES = (64, 128)
PER_CLASS = 30
HARD_NEGATIVES = 20
ORACLE_PAIRS = 80
LOW, HIGH = 0.6, 0.85
FAMILIES = ("none", "flip", "rotation", "shift", "scale", "gamma")
_OFF = {"max_rotation_deg": 0.0, "max_shift_fraction": 0.0, "scale_range": (1.0, 1.0), "flips": False}
SETTINGS = {
    "flip": RegistrationSettings(**{**_OFF, "flips": True}, contrast=False),
    "rotation": RegistrationSettings(**{**_OFF, "flips": True, "max_rotation_deg": 15.0}, contrast=False),
    "shift": RegistrationSettings(max_rotation_deg=15.0, scale_range=(1.0, 1.0), contrast=False),
    "scale": RegistrationSettings(contrast=False),
    "gamma": RegistrationSettings(),
}


# --------------------------------------------------------------------------------------------------
# Data


def build_pairs(seed: int) -> dict:
    """The protocol's pairs of every source plus hard negatives, at 128 px, with labels and kinds."""
    sources = bundled_sources()
    first, second, labels, kinds, names = [], [], [], [], []
    for source in sources:
        others = [o for o in sources if o is not source]
        pairs = plant_pairs(source, others, PER_CLASS, seed)
        first.append(pairs.first)
        second.append(pairs.second)
        labels += pairs.labels.tolist()
        kinds += pairs.kinds
        names += [source.name] * len(pairs.labels)
        # hard negatives: the other-subject image with the highest plain SSIM over the four flips
        rng = np.random.default_rng(seed + 7)
        pool = zscore(source.images.astype(np.float64))
        strangers = zscore(
            np.stack([o.images[r].astype(np.float64) for o in others for r in range(len(o.images))])
        )
        for row in rng.choice(len(pool), min(HARD_NEGATIVES, len(pool)), replace=False):
            other = _other_subject_images(source, int(row), pool, strangers)
            scores = np.max([ssim_matrix(pool[[row]], _flip(other, f))[0] for f in FLIPS], axis=0)
            first.append(pool[[row]])
            second.append(other[[int(np.argmax(scores))]])
            labels.append(DIFFERENT)
            kinds.append("other_subject_hard")
            names.append(source.name)
    return {
        "first": np.concatenate(first),
        "second": np.concatenate(second),
        "labels": np.array(labels),
        "kinds": np.array(kinds),
        "source": np.array(names),
        "sources": [s.name for s in sources],
    }


def _flip(images: np.ndarray, flip: str) -> np.ndarray:
    if flip in ("rows", "both"):
        images = images[:, ::-1]
    if flip in ("cols", "both"):
        images = images[:, :, ::-1]
    return np.ascontiguousarray(images)


def resized(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[-1] == size:
        return images
    if size < images.shape[-1]:  # area average: the images are square and the sizes divide
        f = images.shape[-1] // size
        return images.reshape(len(images), size, f, size, f).mean(axis=(2, 4))
    return np.stack([resize(x, (size, size), order=1, preserve_range=True) for x in images])


# --------------------------------------------------------------------------------------------------
# Registration (cached)


def register_families(first, second, cache: Path) -> dict:
    """Registered SSIM of every pair for each cumulative family, and the full search's transform."""
    if cache.exists():
        with np.load(cache, allow_pickle=True) as data:
            return {k: data[k] for k in data.files}
    out = {}
    for family, settings in SETTINGS.items():
        result = register_pairs(first, second, settings=settings)
        out[family] = result.ssim_registered
        out["none"] = result.ssim_plain
        if family == "gamma":
            for name in ("flip", "rotation_deg", "shift_px", "scale", "gamma"):
                out[f"t_{name}"] = getattr(result, name)
    np.savez(cache, **out)
    return out


def multiscale(first, second, found: dict) -> np.ndarray:
    """(N, 3) SSIM of each pair at full, 1/2 and 1/4 scale after the full search's transform."""
    moved = np.stack(
        [
            apply_transform(
                g,
                str(found["t_flip"][i]),
                float(found["t_rotation_deg"][i]),
                tuple(found["t_shift_px"][i]),
                float(found["t_scale"][i]),
                float(found["t_gamma"][i]),
            )
            for i, g in enumerate(second)
        ]
    )
    return np.stack(
        [ssim_pairs(resized(first, first.shape[-1] // f), resized(moved, first.shape[-1] // f)) for f in (1, 2, 4)],
        axis=1,
    )


# --------------------------------------------------------------------------------------------------
# The oracle check


def inverse_of(flip: str, rotation_deg: float, shift) -> tuple[str, float, np.ndarray]:
    """apply_transform parameters undoing apply_transform(image, flip, rotation_deg, shift, 1.0).

    Content at y moves to R D y + t, so it comes back by D R^-1 (x - t) = R' D (x - t) with
    R' the rotation by -det(D) * rotation_deg, i.e. the same flip, that rotation, shift -R' D t.
    """
    signs = {"none": (1, 1), "rows": (-1, 1), "cols": (1, -1), "both": (-1, -1)}[flip]
    angle = -signs[0] * signs[1] * rotation_deg
    a = np.radians(angle)
    rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return flip, angle, -rotation @ (np.array(signs) * np.asarray(shift, dtype=np.float64))


def oracle_pairs(data: dict, size: int, seed: int):
    """Noisy misaligned copies at ``size``: (train, misaligned copy, SSIM after the exact inverse)."""
    rng = np.random.default_rng(seed + 99)
    rows = rng.choice(np.flatnonzero(data["labels"] == DUPLICATE), ORACLE_PAIRS, replace=False)
    train = resized(zscore(data["first"][rows]), size)
    copies, oracle = [], []
    for image in train:
        noisy = image + rng.normal(0, rng.uniform(0.05, 0.15), image.shape)
        flip = str(rng.choice(FLIPS[1:]))
        rotation = float(rng.choice([-1, 1]) * rng.uniform(6, 10))
        direction = rng.uniform(0, 2 * np.pi)
        shift = 5.0 * size / 128 * np.array([np.cos(direction), np.sin(direction)])
        moved = apply_transform(noisy, flip, rotation, shift, 1.0)
        copies.append(moved)
        back = apply_transform(moved, *inverse_of(flip, rotation, shift), 1.0)
        oracle.append(ssim_pairs(image[None], back[None])[0])
    return train, np.stack(copies), np.array(oracle)


# --------------------------------------------------------------------------------------------------
# Decisions


def macro_f1(scores, labels, low, high) -> float:
    """Macro-F1 over the three classes (score <= low Different, > high Duplicate, else Similar)."""
    predicted = np.where(scores > high, DUPLICATE, np.where(scores <= low, DIFFERENT, SIMILAR))
    f1 = []
    for c in (DIFFERENT, DUPLICATE, SIMILAR):
        tp = np.sum((predicted == c) & (labels == c))
        denominator = np.sum(predicted == c) + np.sum(labels == c)
        f1.append(2 * tp / denominator if denominator else 0.0)
    return float(np.mean(f1))


GRID = np.round(np.arange(0.20, 1.0001, 0.005), 3)


def calibrate_fast(scores, labels) -> tuple[float, float]:
    """Thresholds on a 0.005 grid maximising macro-F1 (vectorised; ties: the first found)."""
    below = scores[None, :] <= GRID[:, None]  # (G, N)
    per_class = {c: below[:, labels == c].sum(axis=1) for c in (DIFFERENT, DUPLICATE, SIMILAR)}
    count = {c: (labels == c).sum() for c in per_class}
    total = below.sum(axis=1)
    n = len(scores)
    low, high = np.meshgrid(np.arange(len(GRID)), np.arange(len(GRID)), indexing="ij")
    valid = low <= high
    f_diff = 2 * per_class[DIFFERENT][low] / np.maximum(total[low] + count[DIFFERENT], 1)
    dup_tp = count[DUPLICATE] - per_class[DUPLICATE][high]
    f_dup = 2 * dup_tp / np.maximum(n - total[high] + count[DUPLICATE], 1)
    sim_tp = per_class[SIMILAR][high] - per_class[SIMILAR][low]
    f_sim = 2 * sim_tp / np.maximum(total[high] - total[low] + count[SIMILAR], 1)
    f = np.where(valid, (f_diff + f_dup + f_sim) / 3, -1)
    i, j = np.unravel_index(np.argmax(f), f.shape)
    return float(GRID[i]), float(GRID[j])


def loso_f1(scores, labels, source, names) -> float:
    """Mean over held-out sources of macro-F1 with thresholds fitted on the other sources."""
    f1 = []
    for name in names:
        held = source == name
        low, high = calibrate_fast(scores[~held], labels[~held])
        f1.append(macro_f1(scores[held], labels[held], low, high))
    return float(np.mean(f1))


def chain_score(families: dict, margins: dict) -> np.ndarray:
    """(a): walk none -> flip -> rotation -> shift -> scale -> gamma; a family's score replaces the
    current one only when it is higher by more than the family's margin (absent: not searched)."""
    current = families["none"].copy()
    for family in FAMILIES[1:]:
        if family in margins:
            take = families[family] > current + margins[family]
            current = np.where(take, families[family], current)
    return current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/registration_null")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_description()}")
    started = time.perf_counter()
    data = build_pairs(args.seed)
    protocol = data["kinds"] != "other_subject_hard"
    print(
        f"{len(data['labels'])} pairs from {', '.join(data['sources'])} "
        f"({protocol.sum()} protocol pairs + {(~protocol).sum()} hard negatives)"
    )
    views = {}
    for size in SIZES:
        first, second = resized(data["first"], size), resized(data["second"], size)
        tick = time.perf_counter()
        families = register_families(first, second, out / f"aligned_{size}.npz")
        ms_cache = out / f"multiscale_{size}.npy"
        if not ms_cache.exists():
            np.save(ms_cache, multiscale(first, second, families))
        families["ms"] = np.load(ms_cache)
        views[("aligned", size)] = families
        print(f"aligned {size} px: {time.perf_counter() - tick:.0f} s")
    mis_first, mis_second = misaligned_views_of(data, args.seed)
    for size in MISALIGNED_SIZES:
        tick = time.perf_counter()
        views[("misaligned", size)] = register_families(
            resized(mis_first, size), resized(mis_second, size), out / f"misaligned_{size}.npz"
        )
        print(f"misaligned {size} px: {time.perf_counter() - tick:.0f} s")
    oracle = {}
    for size in SIZES:
        cache = out / f"oracle_{size}.npz"
        if not cache.exists():
            train, copies, exact = oracle_pairs(data, size, args.seed)
            families = register_families(train, copies, out / f"oracle_families_{size}.npz")
            np.savez(cache, exact=exact, **families)
        with np.load(cache, allow_pickle=True) as saved:
            oracle[size] = {k: saved[k] for k in saved.files}
    report(data, views, oracle, out)
    print(f"total {time.perf_counter() - started:.0f} s")


def misaligned_views_of(data: dict, seed: int):
    class Pairs:  # what generalisation.misaligned reads
        first, second = data["first"], data["second"]

    return misaligned(Pairs, seed)


# --------------------------------------------------------------------------------------------------
# Report


def report(data, views, oracle, out: Path) -> None:
    labels = data["labels"]
    null = labels == DIFFERENT
    for (setting, size), families in views.items():
        for family in FAMILIES:
            s = families[family][null]
            print(setting, size, family, f"median {np.median(s):.3f} q95 {np.quantile(s, 0.95):.3f} max {s.max():.3f} dup {(s > HIGH).sum()}")
    for size, o in oracle.items():
        d = o["gamma"] - o["exact"]
        print("oracle", size, f"within {np.mean(np.abs(d) <= 0.03):.2f} mean {d.mean():+.3f} median {np.median(d):+.3f}")


if __name__ == "__main__":
    main()
