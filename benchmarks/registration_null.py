"""Registered SSIM's null (pairs of different subjects) and the decision at low resolution (issue 22).

    PYTHONPATH=src .venv/bin/python benchmarks/registration_null.py [--out build/registration_null]

Data: the bundled real sources (data/sources, the five sources of benchmarks/generalisation.py,
each brought to 128 px). Per source, the leave-one-source-out protocol's pairs are planted
(deepssim.evaluation.generalisation.plant_pairs, 30 per class, seed 0: degraded copies; neighbouring
slices, deformations and blends; other subjects at random and the most SSIM-similar one), plus up to 20
hard negatives (distinct images of the source), each paired with the other-subject image of highest
plain SSIM over the four flips. Every pair is then resized to 32, 64 and 256 px (area-averaged
down, bilinear up), so one content is measured at four resolutions. Misaligned views (the
protocol's) at 64 and 128 px.

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
from deepssim.labels import Label
from deepssim.ssim.engine import ssim_matrix, ssim_pairs
from deepssim.ssim.registered import FLIPS, RegistrationSettings, apply_transform, register_pairs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from generalisation import bundled_sources  # noqa: E402

DIFFERENT, SIMILAR, DUPLICATE = Label.DIFFERENT, Label.SIMILAR, Label.DUPLICATE

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
        [
            ssim_pairs(resized(first, first.shape[-1] // f), resized(moved, first.shape[-1] // f))
            for f in (1, 2, 4)
        ],
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
        first, second = resized(mis_first, size), resized(mis_second, size)
        families = register_families(first, second, out / f"misaligned_{size}.npz")
        ms_cache = out / f"multiscale_misaligned_{size}.npy"
        if not ms_cache.exists():
            np.save(ms_cache, multiscale(first, second, families))
        families["ms"] = np.load(ms_cache)
        views[("misaligned", size)] = families
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


def rule_a(f: dict, scale_margin: float, gamma_margin: float) -> np.ndarray:
    """(a): scale counts only when it beats the rigid search (flip, rotation, shift) by more than
    scale_margin; gamma only when it beats that geometry by more than gamma_margin."""
    geometry = np.where(f["scale"] > f["shift"] + scale_margin, f["scale"], f["shift"])
    return np.where(f["gamma"] > geometry + gamma_margin, f["gamma"], geometry)


SCORES = {
    "plain SSIM": lambda f, size: f["none"],
    "registered, default search": lambda f, size: f["gamma"],
    "(a) gamma margin 0.05": lambda f, size: rule_a(f, 0.0, 0.05),
    "(a) scale 0.02 + gamma 0.05": lambda f, size: rule_a(f, 0.02, 0.05),
    "(a) scale 0.02 + gamma 0.10": lambda f, size: rule_a(f, 0.02, 0.10),
    "(b) no gamma at <= 64 px": lambda f, size: f["scale"] if size <= 64 else f["gamma"],
    "(b) rigid only at <= 64 px": lambda f, size: f["shift"] if size <= 64 else f["gamma"],
    "multi-scale mean (1, 1/2, 1/4)": lambda f, size: f["ms"].mean(axis=1) if "ms" in f else None,
    "multi-scale min (1, 1/2, 1/4)": lambda f, size: f["ms"].min(axis=1) if "ms" in f else None,
}
POLICIES = ("default 0.6 / 0.85", "(c) null floor", "(c) resolution floor", "size table")


def size_table_high(size: int) -> float:
    """The recommended high threshold by image size (the resolution floors fitted at 64 px, 0.880-0.895,
    rounded): 0.85 from 128 px up, +0.04 per halving below."""
    return HIGH + 0.04 * max(0.0, np.log2(REFERENCE_SIZE / size))


REFERENCE_SIZE = 128


def thresholds_per_pair(policy, scores, ref_scores, labels, kinds, source, names, size) -> np.ndarray:
    """High threshold of every pair (low stays 0.6). The floors are fitted on the other sources:
    null floor = 0.01 above their highest different-subject score at this size; resolution floor =
    the lowest high threshold >= 0.85 (0.005 steps) at which their different-subject pairs give no
    Duplicate and their Similar pairs no more Duplicates than at REFERENCE_SIZE with 0.85."""
    high = np.full(len(scores), HIGH)
    if policy == POLICIES[0]:
        return high
    if policy == POLICIES[3]:
        return np.full(len(scores), size_table_high(size))
    null, similar = labels == DIFFERENT, (labels == SIMILAR) & (kinds != "other_subject_hard")
    for name in names:
        held, rest = source == name, source != name
        if policy == POLICIES[1]:
            high[held] = max(HIGH, scores[rest & null].max() + 0.01)
        else:
            allowed = np.sum(ref_scores[rest & similar] > HIGH)
            for value in np.arange(HIGH, 1.0, 0.005):
                if scores[rest & null].max() <= value and np.sum(scores[rest & similar] > value) <= allowed:
                    break
            high[held] = value
    return high


def pooled_f1(scores, labels, high) -> float:
    predicted = np.where(scores > high, DUPLICATE, np.where(scores <= LOW, DIFFERENT, SIMILAR))
    f1 = []
    for c in (DIFFERENT, DUPLICATE, SIMILAR):
        tp = np.sum((predicted == c) & (labels == c))
        f1.append(2 * tp / max(np.sum(predicted == c) + np.sum(labels == c), 1))
    return float(np.mean(f1))


def oracle_within(oracle: dict, score, size: int) -> float | None:
    if score is None:
        return None
    values = score(oracle[size], size)
    return None if values is None else float(np.mean(np.abs(values - oracle[size]["exact"]) <= 0.03))


def report(data, views, oracle, out: Path) -> None:
    labels, kinds, source, names = data["labels"], data["kinds"], data["source"], data["sources"]
    protocol = kinds != "other_subject_hard"
    null = labels == DIFFERENT
    summary = {"cpu": cpu_description(), "pairs": int(len(labels)), "null_pairs": int(null.sum())}

    lines = ["### The null: registered SSIM of different-subject pairs, by size and search", ""]
    lines += ["| view | size | search (cumulative) | median | 95th pct | max | called Duplicate (> 0.85) |"]
    lines += ["| --- | --- | --- | --- | --- | --- | --- |"]
    null_table = {}
    for (setting, size), f in views.items():
        for family in FAMILIES:
            s = f[family][null]
            row = [float(np.median(s)), float(np.quantile(s, 0.95)), float(s.max()), int((s > HIGH).sum())]
            null_table[f"{setting}/{size}/{family}"] = row
            lines.append(
                f"| {setting} | {size} | {family} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.3f} | "
                f"{row[3]} / {null.sum()} |"
            )
    summary["null"] = null_table

    lines += ["", "### The null per source (default search, aligned): max / pairs > 0.85", ""]
    lines += ["| source | " + " | ".join(f"{s} px" for s in SIZES) + " |", "|---" * (len(SIZES) + 1) + "|"]
    for name in names:
        cells = []
        for size in SIZES:
            s = views[("aligned", size)]["gamma"][null & (source == name)]
            cells.append(f"{s.max():.3f} / {(s > HIGH).sum()} of {len(s)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "### Oracle check: noisy misaligned copies, registered SSIM - SSIM after the exact inverse",
        "",
    ]
    lines += ["| size | search | mean | median | within 0.03 |", "| --- | --- | --- | --- | --- |"]
    for size in SIZES:
        for family in ("shift", "scale", "gamma"):
            d = oracle[size][family] - oracle[size]["exact"]
            lines.append(
                f"| {size} | {family} | {d.mean():+.3f} | {np.median(d):+.3f} | "
                f"{np.mean(np.abs(d) <= 0.03):.0%} |"
            )

    lines += [
        "",
        "### Decision rules (macro-F1 over the 450 protocol pairs; null: all different-subject pairs)",
        "",
    ]
    lines += [
        "| score | thresholds | view | size | null called Duplicate | Similar called Duplicate | "
        "Duplicates found | macro-F1 (thresholds as given) | macro-F1, LOSO-calibrated | "
        "oracle within 0.03 |",
        "|---" * 10 + "|",
    ]
    rows = []
    for score_name, score in SCORES.items():
        for policy in POLICIES:
            for setting, size in views:
                if True:
                    f = views[(setting, size)]
                    values = score(f, size)
                    if values is None:
                        continue
                    reference = score(views[(setting, REFERENCE_SIZE)], REFERENCE_SIZE)
                    high = thresholds_per_pair(policy, values, reference, labels, kinds, source, names, size)
                    sim = protocol & (labels == SIMILAR)
                    dup = protocol & (labels == DUPLICATE)
                    row = {
                        "score": score_name,
                        "thresholds": policy,
                        "view": setting,
                        "size": size,
                        "null_duplicate": int(np.sum(null & (values > high))),
                        "similar_duplicate": int(np.sum(sim & (values > high))),
                        "duplicates_found": int(np.sum(dup & (values > high))),
                        "macro_f1": pooled_f1(values[protocol], labels[protocol], high[protocol]),
                        "macro_f1_loso": loso_f1(values[protocol], labels[protocol], source[protocol], names),
                        "high_range": [float(high.min()), float(high.max())],
                        "oracle_within_003": oracle_within(oracle, score, size)
                        if setting == "aligned"
                        else None,
                    }
                    rows.append(row)
                    oracle_cell = (
                        "" if row["oracle_within_003"] is None else f"{row['oracle_within_003']:.0%}"
                    )
                    high_cell = (
                        f"{row['high_range'][0]:.3f}"
                        if row["high_range"][0] == row["high_range"][1]
                        else f"{row['high_range'][0]:.3f}-{row['high_range'][1]:.3f}"
                    )
                    lines.append(
                        f"| {score_name} | {policy} (high {high_cell}) | {setting} | {size} | "
                        f"{row['null_duplicate']} / {null.sum()} | "
                        f"{row['similar_duplicate']} / {sim.sum()} | "
                        f"{row['duplicates_found']} / {dup.sum()} | {row['macro_f1']:.3f} | "
                        f"{row['macro_f1_loso']:.3f} | {oracle_cell} |"
                    )
    summary["rules"] = rows
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(lines))
    plot(views, oracle, null, source, names, rows, ROOT / "docs" / "registration_null.png")


def plot(views, oracle, null, source, names, rows, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 4.2))
    axes = figure.subplots(1, 3)
    for family in FAMILIES:
        q95 = [np.quantile(views[("aligned", s)][family][null], 0.95) for s in SIZES]
        top = [views[("aligned", s)][family][null].max() for s in SIZES]
        line = axes[0].plot(SIZES, top, marker="o", label=f"{family}: max")[0]
        axes[0].plot(SIZES, q95, marker=".", linestyle=":", color=line.get_color())
    axes[0].axhline(HIGH, color="black", linewidth=0.8)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(SIZES, [str(s) for s in SIZES])
    axes[0].set_title("different-subject pairs: max (solid), 95th pct (dotted)", fontsize=9)
    axes[0].set_xlabel("image size (px)")
    axes[0].set_ylabel("registered SSIM, search up to ...")
    axes[0].legend(fontsize=7)
    for name in names:
        top = [views[("aligned", s)]["gamma"][null & (source == name)].max() for s in SIZES]
        axes[1].plot(SIZES, top, marker="o", label=name)
    axes[1].axhline(HIGH, color="black", linewidth=0.8)
    axes[1].set_xscale("log", base=2)
    axes[1].set_xticks(SIZES, [str(s) for s in SIZES])
    axes[1].set_title("max over different-subject pairs per source (default search)", fontsize=9)
    axes[1].set_xlabel("image size (px)")
    axes[1].legend(fontsize=7)
    chosen = [
        ("registered, default search", "default 0.6 / 0.85"),
        ("registered, default search", "size table"),
        ("(a) gamma margin 0.05", "default 0.6 / 0.85"),
        ("multi-scale min (1, 1/2, 1/4)", "size table"),
    ]
    width = 0.2
    for i, (score, policy) in enumerate(chosen):
        values = []
        for size in MISALIGNED_SIZES:
            row = next(
                r
                for r in rows
                if r["score"] == score
                and r["thresholds"] == policy
                and r["view"] == "aligned"
                and r["size"] == size
            )
            values.append(row["similar_duplicate"])
        x = np.arange(len(MISALIGNED_SIZES)) + (i - 1.5) * width
        axes[2].bar(x, values, width, label=f"{score}, {policy}")
    axes[2].set_xticks(np.arange(len(MISALIGNED_SIZES)), [f"{s} px" for s in MISALIGNED_SIZES])
    axes[2].set_ylim(0, 80)
    axes[2].set_title("Similar pairs called Duplicate (aligned, of 150)", fontsize=9)
    axes[2].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
