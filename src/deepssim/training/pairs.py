"""Training pairs and their SSIM targets: from a CSV, or sampled self-supervised from folders.

A pair is (first, second): ``first`` is a training image; ``second`` is another image,
optionally blended with a third (``partner``, weight 1 - ``alpha``) and optionally degraded
like a generative model's output (``degrade_seed``). The SSIM target is computed once on the
clean, aligned pair with our engine; augmentations come later, in training.

Self-supervised sampling draws candidates of several kinds, each with a continuous strength so
that every SSIM level occurs within a subject and across subjects, computes their SSIM and keeps
an even number per SSIM bin, so near-copies (> 0.85) are as common as unrelated pairs:

- ``copy``: an image and a degraded copy of itself (noise, blur, intensity change);
- ``neighbour``: two slices of one volume 1 to 8 slices apart;
- ``deform``: an image and a smooth elastic deformation of itself of random size (0.3 to 6 px)
  and smoothness, half the time also degraded: a structural change the score must see;
- ``blend``: an image and a mix of it with another image;
- ``same_level``: images of two different subjects at the same anatomical level (same axis,
  slice index within 2), where levels are known (the synthetic subjects share one atlas space):
  the hard negatives;
- ``random``: two unrelated images (a training and a generated image when both are given);
- ``lookalike``: an image and one of its most SSIM-similar images from another source file
  (another subject or volume): the different-patient pairs that look most alike, which
  random pairs almost never give;
- ``texture``: an image and a smooth random texture, half the time inside the image's own
  foreground: what a failed or undertrained generator makes, which must not look like anyone.

Images are split into training and validation by source file before sampling, so no image or
volume appears on both sides.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.io.files import atomic_path, unescape_cell
from deepssim.io.normalise import zscore
from deepssim.ssim.engine import ssim_pairs

KIND_SHARES = {
    "copy": 0.18,
    "neighbour": 0.15,
    "deform": 0.15,
    "blend": 0.1,
    "same_level": 0.14,
    "lookalike": 0.12,
    "random": 0.1,
    "texture": 0.06,
}
MAX_DEFORM_PIXELS = 6.0


def kind_shares(kinds: str = "all") -> dict[str, float]:
    """The sampling share of each pair kind: all of ``KIND_SHARES``, or the comma-separated kinds
    named, their shares renormalised (the augmentation study leaves kinds out this way)."""
    if kinds == "all":
        return dict(KIND_SHARES)
    chosen = [k.strip() for k in kinds.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in KIND_SHARES]
    if unknown or not chosen:
        raise DeepSSIMError(
            f"unknown pair kind {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(KIND_SHARES)} or all"
        )
    total = sum(KIND_SHARES[k] for k in chosen)
    return {k: KIND_SHARES[k] / total for k in chosen}


SAME_LEVEL_TOLERANCE = 2
LOOKALIKES_PER_IMAGE = 8
MAX_LOOKALIKE_POOL = 1500  # images whose all-pairs SSIM is computed to find lookalikes
SSIM_BINS = np.linspace(0.0, 1.0, 11)  # ten bins; SSIM below 0 counts in the first
CANDIDATES_PER_PAIR = 4
MAX_NEIGHBOUR_OFFSET = 8


@dataclass
class PairTable:
    """Pairs as parallel arrays over an image pool; see the module docstring for the columns."""

    first: np.ndarray
    second: np.ndarray
    partner: np.ndarray
    alpha: np.ndarray
    degrade_seed: np.ndarray
    texture_seed: np.ndarray
    deform_seed: np.ndarray
    ssim: np.ndarray
    kind: np.ndarray
    split: np.ndarray

    def __len__(self) -> int:
        return len(self.first)

    def select(self, rows) -> PairTable:
        return PairTable(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def of_split(self, split: str) -> PairTable:
        return self.select(np.flatnonzero(self.split == split))

    def save(self, path: str | Path, fingerprint: str) -> None:
        arrays = {f.name: getattr(self, f.name) for f in fields(self)}
        with atomic_path(path, suffix=".npz") as temporary, open(temporary, "wb") as handle:
            np.savez(handle, fingerprint=np.array(fingerprint), **arrays)

    @classmethod
    def load_cached(cls, path: str | Path, fingerprint: str) -> PairTable | None:
        """The table cached at ``path`` if it was made from the same images and settings."""
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["fingerprint"]) != fingerprint:
                    return None
                return cls(**{f.name: data[f.name] for f in fields(cls)})
        except (OSError, KeyError, ValueError):
            return None


def second_images(pool: np.ndarray, pairs: PairTable) -> np.ndarray:
    """The clean second image of every pair (blended and degraded as the table says)."""
    out = pool[pairs.second].astype(np.float64)
    blended = pairs.partner >= 0
    if blended.any():
        alpha = pairs.alpha[blended, None, None]
        out[blended] = alpha * out[blended] + (1 - alpha) * pool[pairs.partner[blended]]
    for row in np.flatnonzero(pairs.deform_seed >= 0):
        out[row] = deform(out[row], int(pairs.deform_seed[row]))
    for row in np.flatnonzero(pairs.degrade_seed >= 0):
        out[row] = degrade(out[row], int(pairs.degrade_seed[row]))
    for row in np.flatnonzero(pairs.texture_seed >= 0):
        out[row] = texture(out[row], int(pairs.texture_seed[row]))
    return out


def texture(image: np.ndarray, seed: int) -> np.ndarray:
    """A smooth random texture of the image's shape (blobs of a random size), half the time
    confined to the image's foreground; z-scored. Deterministic in ``seed``."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.normal(size=image.shape), sigma=rng.uniform(1.0, 6.0))
    if rng.random() < 0.5:
        field = np.maximum(field, np.quantile(field, rng.uniform(0.3, 0.7)))
    if rng.random() < 0.5:
        foreground = image > np.quantile(image, 0.3)
        field = np.where(foreground, field, field.min())
    if np.ptp(field) == 0:
        field = rng.normal(size=image.shape)
    return zscore(field)


def pair_ssim(pool: np.ndarray, pairs: PairTable, chunk: int = 512) -> np.ndarray:
    """SSIM target of every pair, rendered and computed ``chunk`` pairs at a time."""
    scores = np.empty(len(pairs))
    for start in range(0, len(pairs), chunk):
        part = pairs.select(np.arange(start, min(start + chunk, len(pairs))))
        scores[start : start + len(part)] = ssim_pairs(pool[part.first], second_images(pool, part))
    return scores


def degrade(image: np.ndarray, seed: int, max_strength: float = 1.0) -> np.ndarray:
    """A generative-style near-copy: random strength (up to ``max_strength``) of blur, noise and
    intensity change. Training pairs use the full range to cover every SSIM level; planted
    benchmark Duplicates use a mild one.

    Works on a z-scored image; returns it z-scored. Deterministic in ``seed``.
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    strength = rng.uniform(0.0, 1.0) * max_strength
    out = gaussian_filter(image, sigma=rng.uniform(0.0, 1.5 * strength) + 1e-6)
    unit = (out - out.min()) / max(out.max() - out.min(), 1e-12)
    unit = unit ** np.exp(rng.uniform(-0.3, 0.3) * strength)
    unit = unit + rng.normal(0.0, rng.uniform(0.0, 0.12 * strength), unit.shape)
    return zscore(unit)


def deform(image: np.ndarray, seed: int, pixels: float | None = None) -> np.ndarray:
    """A smooth random elastic deformation: displacement of at most ``pixels`` (drawn in
    0.3-``MAX_DEFORM_PIXELS`` when None) with a random smoothness. Deterministic in ``seed``."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    rng = np.random.default_rng(seed)
    pixels = rng.uniform(0.3, MAX_DEFORM_PIXELS) if pixels is None else pixels
    height, width = image.shape
    smoothness = max(height, width) / rng.uniform(4.0, 16.0)
    fields = []
    for _ in range(2):
        field = gaussian_filter(rng.normal(size=image.shape), sigma=smoothness)
        fields.append(field / max(np.abs(field).max(), 1e-12) * pixels)
    rows, columns = np.mgrid[:height, :width].astype(np.float64)
    return map_coordinates(image, [rows + fields[0], columns + fields[1]], order=1, mode="nearest")


def split_by_group(groups: list[str], val_fraction: float, seed: int) -> np.ndarray:
    """'train' / 'val' per image so that every group (source file) falls on one side."""
    unique = sorted(set(groups))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(unique))
    n_val = int(round(val_fraction * len(unique)))
    if val_fraction > 0 and len(unique) >= 2:
        n_val = min(max(n_val, 1), len(unique) - 1)
    val_groups = {unique[i] for i in order[:n_val]}
    return np.array(["val" if g in val_groups else "train" for g in groups])


def sample_pairs(
    pool: np.ndarray,
    groups: list[str],
    slice_index: np.ndarray,
    n_pairs: int,
    val_fraction: float = 0.2,
    seed: int = 0,
    generated: np.ndarray | None = None,
    stacks: list[str] | None = None,
    levels: list[str] | None = None,
    kinds: str = "all",
) -> PairTable:
    """Self-supervised pairs stratified by SSIM over a pool of z-scored images.

    pool: (N, H, W) images; the first ``len(groups)`` are training images, the rest (indices in
    ``generated``) generated ones. groups: the subject or source file of each training image
    (the split unit); slice_index: each training image's slice number in its stack, or -1.
    stacks: the stack (volume and axis) of each image, within which slices are neighbours
    (default: the group). levels: each image's anatomical axis ("" where unknown); images of one
    axis whose slice indices differ by at most ``SAME_LEVEL_TOLERANCE`` are at the same level.
    kinds: the pair kinds to draw (:func:`kind_shares`).
    """
    shares = kind_shares(kinds)
    stacks = list(groups) if stacks is None else list(stacks)
    levels = [""] * len(groups) if levels is None else list(levels)
    n_train_images = len(groups)
    image_split = split_by_group(groups, val_fraction, seed)
    rng = np.random.default_rng(seed)
    generated = np.array([], dtype=int) if generated is None else np.asarray(generated)
    generated_split = np.where(rng.random(len(generated)) < val_fraction, "val", "train")
    tables = []
    for split in ("train", "val"):
        members = np.flatnonzero(image_split == split)
        if len(members) == 0:
            continue
        share = len(members) / n_train_images
        target = max(int(round(n_pairs * share)), 1)
        others = generated[generated_split == split]
        candidates = _candidates(
            rng,
            shares,
            pool,
            members,
            others,
            groups,
            stacks,
            levels,
            slice_index,
            CANDIDATES_PER_PAIR * target,
            split,
        )
        candidates.ssim = pair_ssim(pool, candidates)
        tables.append(candidates.select(_stratified(rng, candidates.ssim, target)))
    return _concatenate(tables)


def _candidates(
    rng, shares, pool, members, others, groups, stacks, levels, slice_index, count, split
) -> PairTable:
    # wide enough for the fallback kinds ("lookalike", "random") whatever kinds were drawn
    kinds = rng.choice(list(shares), size=count, p=list(shares.values())).astype("<U16")
    first = rng.choice(members, size=count)
    second = first.copy()
    partner = np.full(count, -1)
    alpha = np.ones(count)
    degrade_seed = np.full(count, -1, dtype=np.int64)
    texture_seed = np.full(count, -1, dtype=np.int64)
    deform_seed = np.full(count, -1, dtype=np.int64)
    unrelated = np.concatenate([members, others]) if len(others) else members
    by_slice = {(stacks[m], int(slice_index[m])): m for m in members if slice_index[m] >= 0}
    by_level = _by_level(members, levels, slice_index)
    lookalikes = _lookalikes(rng, pool, members, groups)
    for row, kind in enumerate(kinds):
        if kind == "copy":
            degrade_seed[row] = rng.integers(2**62)
        elif kind == "neighbour":
            neighbour = _neighbour(rng, first[row], by_slice, stacks, slice_index)
            if neighbour is None:  # a 2D image has no neighbours: degrade instead
                kinds[row] = "copy"
                degrade_seed[row] = rng.integers(2**62)
            else:
                second[row] = neighbour
        elif kind == "blend":
            partner[row] = rng.choice(members)
            alpha[row] = rng.uniform(0.3, 0.95)
            if rng.random() < 0.5:
                degrade_seed[row] = rng.integers(2**62)
        elif kind == "deform":
            deform_seed[row] = rng.integers(2**62)
            if rng.random() < 0.5:
                degrade_seed[row] = rng.integers(2**62)
        elif (
            kind == "same_level"
            and (partner_row := _same_level(rng, first[row], by_level, groups, levels, slice_index))
            is not None
        ):
            second[row] = partner_row
        elif kind in ("lookalike", "same_level") and first[row] in lookalikes:
            kinds[row] = "lookalike"
            second[row] = rng.choice(lookalikes[first[row]])
        elif kind == "texture":
            texture_seed[row] = rng.integers(2**62)
        else:
            kinds[row] = "random"
            second[row] = rng.choice(others) if len(others) and rng.random() < 0.5 else rng.choice(unrelated)
    return PairTable(
        first=first,
        second=second,
        partner=partner,
        alpha=alpha,
        degrade_seed=degrade_seed,
        texture_seed=texture_seed,
        deform_seed=deform_seed,
        ssim=np.zeros(count),
        kind=kinds.astype(str),
        split=np.full(count, split),
    )


def _lookalikes(rng, pool, members, groups) -> dict[int, np.ndarray]:
    """For (up to MAX_LOOKALIKE_POOL) members: their most SSIM-similar images of other groups."""
    from deepssim.ssim.engine import ssim_matrix

    pool_rows = (
        members
        if len(members) <= MAX_LOOKALIKE_POOL
        else rng.choice(members, MAX_LOOKALIKE_POOL, replace=False)
    )
    pool_rows = np.sort(pool_rows)
    scores = ssim_matrix(pool[pool_rows], pool[pool_rows])
    group = np.array([groups[m] for m in pool_rows])
    scores[group[:, None] == group[None, :]] = -np.inf
    out = {}
    for i, image in enumerate(pool_rows):
        best = np.argsort(-scores[i])[:LOOKALIKES_PER_IMAGE]
        best = best[np.isfinite(scores[i, best])]
        if len(best):
            out[int(image)] = pool_rows[best]
    return out


def _neighbour(rng, image, by_slice, stacks, slice_index):
    """A slice of the same stack a few slices away, or None (2D image, edge of the volume)."""
    if slice_index[image] < 0:
        return None
    offset = int(rng.integers(1, MAX_NEIGHBOUR_OFFSET + 1)) * (1 if rng.random() < 0.5 else -1)
    return by_slice.get((stacks[image], int(slice_index[image]) + offset))


def _by_level(members, levels, slice_index) -> dict[tuple[str, int], list[int]]:
    """Members indexed by (axis, slice index), for images whose anatomical level is known."""
    out: dict[tuple[str, int], list[int]] = {}
    for m in members:
        if levels[m]:
            out.setdefault((levels[m], int(slice_index[m])), []).append(int(m))
    return out


def _same_level(rng, image, by_level, groups, levels, slice_index):
    """An image of another subject at the same anatomical level, or None."""
    if not levels[image]:
        return None
    offset = int(rng.integers(-SAME_LEVEL_TOLERANCE, SAME_LEVEL_TOLERANCE + 1))
    candidates = [
        m
        for m in by_level.get((levels[image], int(slice_index[image]) + offset), [])
        if groups[m] != groups[image]
    ]
    return int(rng.choice(candidates)) if candidates else None


def _stratified(rng, scores: np.ndarray, target: int) -> np.ndarray:
    """Row indices with about ``target / bins`` rows from each SSIM bin that has any."""
    bins = np.clip(np.digitize(scores, SSIM_BINS[1:-1]), 0, len(SSIM_BINS) - 2)
    filled = [np.flatnonzero(bins == b) for b in range(len(SSIM_BINS) - 1)]
    filled = [rows for rows in filled if len(rows)]
    per_bin = -(-target // len(filled))
    chosen = [rng.choice(rows, size=per_bin, replace=len(rows) < per_bin) for rows in filled]
    return rng.permutation(np.concatenate(chosen))[:target]


def _concatenate(tables: list[PairTable]) -> PairTable:
    return PairTable(
        **{f.name: np.concatenate([getattr(t, f.name) for t in tables]) for f in fields(PairTable)}
    )


LEGACY_COLUMNS = {"real_key": "train_key", "synth_key": "generated_key", "synthetic_key": "generated_key"}


def read_pair_csv(path: str | Path) -> list[dict]:
    """Rows of a pairs CSV with columns ``train_key, generated_key[, ssim][, split]``."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [{k: unescape_cell(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    except OSError as error:
        raise DeepSSIMError(f"{path}: cannot read the pairs file ({error.strerror})") from None
    if not rows:
        raise DeepSSIMError(f"{path}: the pairs file has no rows")
    for old, new in LEGACY_COLUMNS.items():  # files written before the roles had one name
        if old in rows[0] and new not in rows[0]:
            for row in rows:
                row[new] = row.pop(old)
    missing = {"train_key", "generated_key"} - set(rows[0])
    if missing:
        raise DeepSSIMError(
            f"{path}: missing column(s) {', '.join(sorted(missing))}; have {', '.join(rows[0])}"
        )
    return rows


def pairs_from_csv(
    path: str | Path,
    train_keys: list[str],
    generated_keys: list[str],
    pool: np.ndarray,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> PairTable:
    """Listed pairs over a pool holding the training images, then the generated ones.

    Missing SSIM values are computed; without a ``split`` column, training images are split at
    random and each pair goes where its training image went.
    """
    rows = read_pair_csv(path)
    train_index = {k: i for i, k in enumerate(train_keys)}
    generated_index = {k: len(train_keys) + i for i, k in enumerate(generated_keys)}
    first, second = [], []
    for line, row in enumerate(rows, start=2):
        if row["train_key"] not in train_index:
            raise DeepSSIMError(
                f"{path}:{line}: train_key {row['train_key']!r} is not among the training images"
            )
        if row["generated_key"] not in generated_index:
            raise DeepSSIMError(
                f"{path}:{line}: generated_key {row['generated_key']!r} is not among the generated images"
            )
        first.append(train_index[row["train_key"]])
        second.append(generated_index[row["generated_key"]])
    first, second = np.array(first), np.array(second)
    count = len(rows)
    table = PairTable(
        first=first,
        second=second,
        partner=np.full(count, -1),
        alpha=np.ones(count),
        degrade_seed=np.full(count, -1, dtype=np.int64),
        texture_seed=np.full(count, -1, dtype=np.int64),
        deform_seed=np.full(count, -1, dtype=np.int64),
        ssim=np.zeros(count),
        kind=np.full(count, "listed"),
        split=np.full(count, "train"),
    )
    if "ssim" in rows[0] and all(row["ssim"] not in ("", None) for row in rows):
        table.ssim = np.array([float(row["ssim"]) for row in rows])
    else:
        table.ssim = pair_ssim(pool, table)
    if "split" in rows[0]:
        table.split = np.array([row["split"] for row in rows])
        unknown = set(table.split) - {"train", "val"}
        if unknown:
            raise DeepSSIMError(f"{path}: split must be 'train' or 'val'; found {', '.join(sorted(unknown))}")
    else:
        image_split = split_by_group(train_keys, val_fraction, seed)
        table.split = image_split[first]
    return table


def fingerprint(pool: np.ndarray, keys: list[str], settings: dict) -> str:
    """A hash of the images and the sampling settings: the cache key of a pair table."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"keys": keys, "settings": settings}, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(pool).tobytes())
    return digest.hexdigest()
