"""Registered SSIM: the exact SSIM of a generated image after the rigid transform that best aligns it
to a training image.

Why: a generator that memorised a training image may still emit it flipped, rotated, shifted or
slightly rescaled (the augmentations it was trained with), and plain SSIM then misses the copy. The
search space is the four flips x rotation within +-15 deg x shift within +-10% of the size x isotropic
scale 0.9-1.1, applied to the *generated* image (flip first, then rotation and scale about the image
centre, then shift; content moves by ``shift_px``; pixels from outside take the image's minimum),
after a contrast gamma fitted on intensity quantiles.

This module is the public API and its types; the search itself (coarse grid, Gauss-Newton, warping
and the exact scoring rules) is in :mod:`deepssim.ssim._alignment`. How it works and what its bias
is, as measured: ``docs/registration.md``.
"""

from __future__ import annotations

import math
import re
from contextlib import nullcontext
from dataclasses import dataclass, fields

import numpy as np
import torch

from deepssim.errors import DeepSSIMError
from deepssim.io.normalise import zscore
from deepssim.progress import progress_iter
from deepssim.ssim import _alignment
from deepssim.ssim._alignment import (
    FLIPS,
    ChunkImages,
    TrainingImages,
    _exact_transform,
    _level,
    _register_chunk,
    _sampling_map,
    _score_candidates,
    _warp,
)
from deepssim.ssim.engine import _in_threads, _ssim_kernel, kernel_threads

GAMMAS = np.exp(np.linspace(np.log(0.4), np.log(2.5), 41))  # contrast changes tried (1.0 included)
_WINDOW = 7  # the SSIM window: images must be at least this large
_CPU_CHUNK, _GPU_CHUNK = 256, 4096  # RegistrationSettings.chunk's defaults


@dataclass(frozen=True)
class RegistrationSettings:
    """The search space (applied to the generated image) and how to run the search."""

    max_rotation_deg: float = 15.0
    max_shift_fraction: float = 0.10
    scale_range: tuple[float, float] = (0.9, 1.1)
    flips: bool = True
    contrast: bool = True
    device: str = "cpu"
    # pairs searched together; None: 256 on the CPU (8-15% faster than 128 on 2 cores, the same
    # results), 4096 on a GPU (fewer, larger kernel launches)
    chunk: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_rotation_deg) and 0 <= self.max_rotation_deg <= 90):
            raise DeepSSIMError(f"max_rotation_deg must be within [0, 90], not {self.max_rotation_deg}")
        if not (math.isfinite(self.max_shift_fraction) and 0 <= self.max_shift_fraction <= 0.5):
            raise DeepSSIMError(f"max_shift_fraction must be within [0, 0.5], not {self.max_shift_fraction}")
        try:
            low, high = (float(v) for v in self.scale_range)
        except (TypeError, ValueError):
            raise DeepSSIMError(f"scale_range must be (low, high), not {self.scale_range!r}") from None
        if not (math.isfinite(low) and math.isfinite(high) and 0.5 <= low <= 1 <= high <= 2):
            raise DeepSSIMError(
                f"scale_range must satisfy 0.5 <= low <= 1 <= high <= 2, not {self.scale_range}"
            )
        if not isinstance(self.flips, bool) or not isinstance(self.contrast, bool):
            raise DeepSSIMError(
                f"flips and contrast must be True or False, not {self.flips!r}, {self.contrast!r}"
            )
        if self.chunk is not None and (
            not isinstance(self.chunk, int) or isinstance(self.chunk, bool) or self.chunk < 1
        ):
            raise DeepSSIMError(f"chunk must be a positive integer or None, not {self.chunk!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise DeepSSIMError(f"unknown torch device {self.device!r}") from None

    @property
    def pairs_per_chunk(self) -> int:
        if self.chunk is not None:
            return self.chunk
        return _CPU_CHUNK if torch.device(self.device).type == "cpu" else _GPU_CHUNK


@dataclass
class Registration:
    """Registered and plain SSIM and the transform found for the generated image (flip, rotation
    in degrees, shift in pixels (..., 2), scale, contrast gamma), per pair: arrays of one shape,
    (N,) from :func:`register_pairs` or (M, k) for a scan's top-k pairs (NaN where not computed).
    Methods take the pair's index: ``i`` or ``(i, rank)``."""

    ssim_registered: np.ndarray
    ssim_plain: np.ndarray
    flip: np.ndarray
    rotation_deg: np.ndarray
    shift_px: np.ndarray
    scale: np.ndarray
    gamma: np.ndarray
    # False where the cascade did not search the pair: its score is then the exact SSIM of the
    # unmoved image (the transform says so), a lower bound of its registered SSIM
    searched: np.ndarray | None = None

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> Registration:
        """All pairs not computed yet: NaN scores, no flip."""
        nan = np.full(shape, np.nan)
        return cls(
            nan.copy(),
            nan.copy(),
            np.full(shape, "", dtype=object),
            nan.copy(),
            np.full((*shape, 2), np.nan),
            nan.copy(),
            nan.copy(),
            np.zeros(shape, dtype=bool),
        )

    def __len__(self) -> int:
        return len(self.ssim_registered)

    def has(self, *index) -> bool:
        return bool(np.isfinite(self.ssim_registered[index]))

    def transform(self, *index) -> dict:
        """Keyword arguments of :func:`apply_transform` for one pair."""
        return {
            "flip": str(self.flip[index]),
            "rotation_deg": float(self.rotation_deg[index]),
            "shift_px": tuple(float(v) for v in self.shift_px[index]),
            "scale": float(self.scale[index]),
            "gamma": float(self.gamma[index]),
        }

    def transform_text(self, *index) -> str:
        """One pair's transform in one line: ``flip=cols rot=8.0 shift=(5,-2) scale=1.00 gamma=0.71``."""
        return transform_text(**self.transform(*index))

    def reordered(self, order: np.ndarray) -> Registration:
        """(M, k) pairs with each row's pairs put in ``order`` (as from argsort along axis 1)."""

        def take(values):
            return np.take_along_axis(values, order if values.ndim == 2 else order[..., None], axis=1)

        return Registration(
            *(None if getattr(self, f.name) is None else take(getattr(self, f.name)) for f in fields(self))
        )


def transform_text(flip: str, rotation_deg: float, shift_px, scale: float, gamma: float) -> str:
    rows, cols = shift_px
    geometry = f"flip={flip} rot={rotation_deg:.1f} shift=({rows:.3g},{cols:.3g}) scale={scale:.2f}"
    return f"{geometry} gamma={gamma:.2f}"


_TRANSFORM_TEXT = re.compile(
    r"flip=(?P<flip>\w+) rot=(?P<rot>\S+) shift=\((?P<rows>[^,]+),(?P<cols>[^)]+)\) "
    r"scale=(?P<scale>\S+)(?: gamma=(?P<gamma>\S+))?"
)


def parse_transform(text: str) -> dict:
    """The keyword arguments of :func:`apply_transform` from a ``transform`` column of pairs.csv."""
    match = _TRANSFORM_TEXT.fullmatch(text.strip())
    if match is None or match["flip"] not in FLIPS:
        raise DeepSSIMError(f"not a transform as pairs.csv writes it: {text!r}")
    return {
        "flip": match["flip"],
        "rotation_deg": float(match["rot"]),
        "shift_px": (float(match["rows"]), float(match["cols"])),
        "scale": float(match["scale"]),
        "gamma": float(match["gamma"] or 1.0),
    }


def register_pairs(
    train, generated, *, settings: RegistrationSettings = RegistrationSettings(), progress: bool = False
) -> Registration:
    """Register every generated[i] onto train[i] and return the exact SSIM before and after.

    train, generated: (N, H, W) arrays of raw intensities (each image is z-scored on its own, as the
    SSIM definition of ``deepssim.ssim`` requires). ``ssim_registered[i]`` equals that SSIM of
    (train[i], apply_transform(generated[i], *transform of i)) and is never below ``ssim_plain[i]``.
    """
    train, generated = _check_pairs(train, generated)
    index = np.arange(len(train))
    return register_indexed(train, generated, index, index, settings=settings, progress=progress)


def register_indexed(
    train,
    generated,
    train_index,
    generated_index,
    *,
    settings: RegistrationSettings = RegistrationSettings(),
    progress: bool = False,
) -> Registration:
    """:func:`register_pairs` of the pairs (train[train_index[p]], generated[generated_index[p]]).

    train: an (N, H, W) array, or a :class:`TrainingImages` to reuse across calls (what it has
    prepared is kept). Each training image is prepared once however many pairs and chunks it is in,
    each generated image once per chunk of pairs (a scan's generated image is in k pairs).
    """
    training, generated = _check_images(train, generated, settings)
    ti, gi = _check_pair_index(train_index, generated_index, len(training), len(generated))
    result = _blank(len(ti))
    with _threads_for(settings):
        gammas = _PairGammas(training, generated, ti, gi, settings)
        rows = np.arange(len(ti))
        _register_rows(training, generated, ti, gi, gammas, rows, settings, result, progress)
    result.flip = result.flip.astype(str)
    return result


def _threads_for(settings: RegistrationSettings):
    """:func:`kernel_threads` where the C kernels do the work (on the CPU); elsewhere torch does it
    and keeps its threads."""
    kernels = _ssim_kernel is not None and _alignment._warp_kernel is not None
    return kernel_threads() if kernels and torch.device(settings.device).type == "cpu" else nullcontext()


def _blank(n: int) -> Registration:
    """n pairs not searched yet: no score, the identity transform."""
    return Registration(
        ssim_registered=np.full(n, np.nan),
        ssim_plain=np.full(n, np.nan),
        flip=np.full(n, "none", dtype=object),
        rotation_deg=np.zeros(n),
        shift_px=np.zeros((n, 2)),
        scale=np.ones(n),
        gamma=np.ones(n),
        searched=np.zeros(n, dtype=bool),
    )


def _register_rows(training, generated, ti, gi, gammas, rows, settings, result, progress, what="registering"):
    """Search and score the pairs ``rows`` (indices into ti, gi) into ``result[rows]``; ``gammas``: a
    :class:`_PairGammas` of all the pairs."""
    if len(rows) == 0:
        return
    gamma_index = gammas.of(rows)
    result.gamma[rows] = GAMMAS[gamma_index]
    with torch.no_grad():
        chunks = _chunks(training, generated, ti[rows], gi[rows], gamma_index, settings, progress, what)
        for part, images in chunks:
            _register_chunk(images, settings, result, rows[part])
    # The untouched image is always a candidate: registered SSIM is never below plain SSIM, and
    # where plain SSIM is the best the transform is the identity.
    untouched = rows[result.ssim_plain[rows] >= result.ssim_registered[rows]]
    result.ssim_registered[untouched] = result.ssim_plain[untouched]
    result.flip[untouched] = "none"
    result.rotation_deg[untouched], result.scale[untouched], result.gamma[untouched] = 0.0, 1.0, 1.0
    result.shift_px[untouched] = 0.0
    result.searched[rows] = True


def register_cascade(
    train,
    generated,
    train_index,
    generated_index,
    thresholds: tuple[float, float],
    *,
    settings: RegistrationSettings = RegistrationSettings(),
    progress: bool = False,
) -> Registration:
    """Registered SSIM where it can change a generated image's class, with less work: the classes
    of :func:`register_indexed` by construction.

    Pairs belong to generated images (``generated_index``), each image's in the order given (a scan
    gives them best retrieved first); each image's class comes from its best pair (Different <= low <
    Similar <= high < Duplicate, ``thresholds`` = (low, high)). Each image's pairs are registered in
    that order until one is above high: the image is then a Duplicate whatever its other pairs
    score, and they get only their plain SSIM (a lower bound of their registered SSIM, ``searched``
    False), except that one whose plain SSIM beats the verified copy is registered too (so the pair
    shown is always a registered one). An image with no pair above high has every pair registered, so
    its class and best pair are those of full registration. A Duplicate's pair is a verified copy,
    the first in the order given, which may not be the best of its k.
    """
    low, high = (float(v) for v in thresholds)
    if not low <= high:
        raise DeepSSIMError(f"thresholds must be (low, high) with low <= high, not {thresholds}")
    training, generated = _check_images(train, generated, settings)
    ti, gi = _check_pair_index(train_index, generated_index, len(training), len(generated))
    result = _blank(len(ti))
    with _threads_for(settings):
        gammas = _PairGammas(training, generated, ti, gi, settings)
        rank = _rank_within_image(gi)
        best = np.full(len(generated), -np.inf)  # each generated image's best registered SSIM so far
        first, found = 0, 1.0
        while len(rank) and first <= rank.max():
            # Rounds of ranks 1, 2, 3-4, 5-8, ... while they keep finding copies (an image's pairs in one
            # round share its contrast images, so rounds cost more than one pass); then all the rest.
            stop = max(1, 2 * first) if found >= _SPLIT_WHILE_FOUND else int(rank.max()) + 1
            rows = np.flatnonzero((rank >= first) & (rank < stop) & (best[gi] <= high))
            what = f"registering ranks {first + 1}-{stop}"
            _register_rows(training, generated, ti, gi, gammas, rows, settings, result, progress, what)
            np.maximum.at(best, gi[rows], result.ssim_registered[rows])
            images = np.unique(gi[rows])
            found = float(np.mean(best[images] > high)) if len(images) else 0.0
            first = stop
        rest = np.flatnonzero(~result.searched)  # pairs of Duplicates after their verified copy
        plain = _plain_ssim(training, generated, ti[rest], gi[rest], settings.pairs_per_chunk)
        result.ssim_plain[rest] = result.ssim_registered[rest] = plain
        beats = rest[plain > best[gi[rest]]]
        _register_rows(training, generated, ti, gi, gammas, beats, settings, result, progress)
    result.flip = result.flip.astype(str)
    return result


# The cascade registers rank by rank while at least this share of a round's images become Duplicates.
_SPLIT_WHILE_FOUND = 0.1


def _rank_within_image(gi: np.ndarray) -> np.ndarray:
    """Each pair's position among its generated image's pairs, in the order given."""
    order = np.argsort(gi, kind="stable")
    ordered = gi[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    position = np.arange(len(gi)) - np.repeat(starts, np.diff(np.r_[starts, len(gi)]))
    rank = np.empty(len(gi), dtype=np.int64)
    rank[order] = position
    return rank


def _plain_ssim(training: TrainingImages, generated: np.ndarray, ti, gi, chunk: int) -> np.ndarray:
    """Exact SSIM of the unmoved pairs (training image ti[p], generated[gi[p]])."""
    out = np.empty(len(ti))
    for start in range(0, len(ti), chunk):
        part = slice(start, start + chunk)
        used, rows = np.unique(ti[part], return_inverse=True)
        slots = training.slots(used)[rows]
        kinds = {"plain": (np.arange(len(slots)), generated, gi[part])}
        out[part] = _score_candidates(training, slots, kinds)["plain"]
    return out


class _PairGammas:
    """Each pair's contrast gamma as an index into GAMMAS (the unit gamma without contrast), fitted
    when a pair is first registered: each image's quantiles are computed once, and the pairs the
    cascade never searches are never fitted (at 1/10 scale they are half the pairs)."""

    def __init__(self, training: TrainingImages, generated, ti, gi, settings) -> None:
        self.contrast = settings.contrast and len(ti) > 0
        if self.contrast:
            used_train, self.train_rows = np.unique(ti, return_inverse=True)
            used_generated, self.generated_rows = np.unique(gi, return_inverse=True)
            self.train_quantiles = training.quantiles(used_train, _quantiles)
            self.generated_powers = _powers(_quantiles(generated, used_generated))

    def of(self, pairs: np.ndarray) -> np.ndarray:
        if not self.contrast:
            return np.full(len(pairs), _UNIT_GAMMA)
        return _gamma_index(
            self.train_quantiles, self.generated_powers, self.train_rows[pairs], self.generated_rows[pairs]
        )


def _chunks(training, generated, ti, gi, gamma_index, settings, progress, what):
    """Chunks of about ``settings.pairs_per_chunk`` pairs, each generated image once: (slice of the pairs,
    :class:`ChunkImages`); each training image is prepared once for all chunks (:class:`TrainingImages`)."""
    bounds = [*range(0, len(ti), settings.pairs_per_chunk), len(ti)]
    spans = list(zip(bounds[:-1], bounds[1:], strict=True))
    for start, stop in progress_iter(spans, what, "chunk", progress):
        part = slice(start, stop)
        used_train, pt = np.unique(ti[part], return_inverse=True)
        pt = training.slots(used_train)[pt]
        used_original, po = np.unique(gi[part], return_inverse=True)
        # one contrast-registered image per (generated image, gamma) of the chunk
        keys, pc = np.unique(gi[part] * len(GAMMAS) + gamma_index[part], return_inverse=True)
        owners, gammas = np.divmod(keys, len(GAMMAS))
        contrast, contrast_z = _contrast_images(generated, GAMMAS[gammas], owners)
        changed = GAMMAS[gammas] != 1.0
        yield (
            part,
            ChunkImages(training, contrast, contrast_z, generated[used_original], (pt, pc, po), changed),
        )


_LEVELS = np.linspace(0.01, 0.99, 99)  # the intensity quantiles the contrast gamma is fitted on
_UNIT_GAMMA = int(np.argmin(np.abs(np.log(GAMMAS))))


def _quantiles(images: np.ndarray, rows=None) -> np.ndarray:
    """(n, 99) intensity quantiles of each image (of ``images[rows]``) min-max scaled to [0, 1]; every
    other row and column: a quarter of the pixels estimate 99 quantiles well enough.

    As ``np.quantile`` (linear interpolation) of the scaled pixels, but the scaling is linear, so the
    raw sample is sorted once and only the 99 quantiles are scaled: about 5x faster. The chosen
    images are never copied whole (at scale that copy cost more than the quantiles)."""
    images = np.asarray(images)
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    out = np.empty((len(rows), len(_LEVELS)))

    def run(start: int, stop: int) -> None:  # NumPy's sort leaves the GIL: the threads share the work
        out[start:stop] = _scaled_quantiles(images, rows[start:stop])

    _in_threads(len(rows), run, minimum=64)
    return out


def _scaled_quantiles(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    low = np.array([images[r].min() for r in rows], dtype=np.float64)[:, None]
    span = np.maximum(np.array([images[r].max() for r in rows], dtype=np.float64)[:, None] - low, 1e-12)
    sample = np.sort(images[rows, ::2, ::2].reshape(len(rows), -1), axis=1).astype(np.float64)
    position = _LEVELS * (sample.shape[1] - 1)
    below = np.floor(position).astype(np.int64)
    above = np.minimum(below + 1, sample.shape[1] - 1)
    fraction = position - below
    values = sample[:, below] + (sample[:, above] - sample[:, below]) * fraction
    return (values - low) / span


def _powers(quantiles: np.ndarray) -> np.ndarray:
    """(n, gammas, 99): each image's quantiles raised to every gamma."""
    return quantiles[:, None, :] ** GAMMAS[None, :, None]


def _gamma_index(train_quantiles, generated_powers, train_rows, generated_rows) -> np.ndarray:
    """Per pair, the index into ``GAMMAS`` of the gamma that brings the generated image's quantiles
    (raised to each gamma: ``generated_powers``) closest to the training image's (least squares);
    each image's quantiles are computed and raised once, however many pairs it is in."""
    out = np.empty(len(train_rows), dtype=np.int64)

    def run(first: int, last: int) -> None:  # the threads share the pairs
        for start in range(first, last, 256):  # temporaries of ~8 MB, not one per pair at once
            part = slice(start, min(start + 256, last))
            target = train_quantiles[train_rows[part]][:, None, :]
            difference = generated_powers[generated_rows[part]] - target
            out[part] = np.argmin(np.einsum("pgq,pgq->pg", difference, difference), axis=1)

    _in_threads(len(out), run, minimum=256)
    return out


def contrast_gamma(train: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """Per pair, the gamma (``GAMMAS``) that brings the generated image's intensity quantiles closest
    to the training image's, both min-max scaled to [0, 1] (least squares over 99 quantiles)."""
    index = np.arange(len(train))
    return GAMMAS[_gamma_index(_quantiles(train), _powers(_quantiles(generated)), index, index)]


def _unit(images: np.ndarray) -> np.ndarray:
    low = images.min(axis=(-2, -1), keepdims=True)
    high = images.max(axis=(-2, -1), keepdims=True)
    return (images - low) / np.maximum(high - low, 1e-12)


def _apply_gamma(images: np.ndarray, gamma) -> np.ndarray:
    """Min-max scale to [0, 1] and raise to ``gamma`` (per image); gamma 1 leaves an image as it is."""
    return _contrast_images(np.ascontiguousarray(images, dtype=np.float64), gamma)[0]


def _contrast_images(images: np.ndarray, gamma, rows=None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_apply_gamma` of ``images[rows]`` (all by default), and the results z-scored in float32
    (what the search takes). The C kernel does both in one pass per image in cache, without copying
    the chosen images first (registration makes one per pair)."""
    rows = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64)
    gamma = np.ascontiguousarray(np.broadcast_to(np.asarray(gamma, dtype=np.float64), (len(rows),)))
    if _ssim_kernel is not None and images.dtype == np.float64 and images.flags.c_contiguous:
        out = np.empty((len(rows), *images.shape[1:]))
        z = np.empty(out.shape, dtype=np.float32)
        pixels = images[0].size

        def run(start: int, stop: int) -> int:
            part = slice(start, stop)
            code = _ssim_kernel.contrast_images(
                images, rows[part], gamma[part], out[part], z[part], stop - start, pixels
            )
            return code if code <= 0 else start + code

        codes = [code for code in _in_threads(len(rows), run, minimum=4) if code]
        if any(code < 0 for code in codes):
            raise MemoryError("the contrast kernel could not allocate its workspace")
        if codes:
            raise DeepSSIMError(
                f"generated image {rows[codes[0] - 1]} is constant: a constant image has no standard "
                "deviation and cannot be z-scored"
            )
        return out, z
    out = np.array(images[rows], dtype=np.float64)
    change = gamma != 1.0
    out[change] = _unit(out[change]) ** gamma[change][:, None, None]
    return out, zscore(out).astype(np.float32)


def registered_ssim(train_image, generated_image, **kwargs) -> float:
    """Registered SSIM of one (training, generated) pair of 2D images; kwargs go to register_pairs."""
    train_image, generated_image = np.asarray(train_image), np.asarray(generated_image)
    if train_image.ndim != 2 or generated_image.ndim != 2:
        raise DeepSSIMError(
            f"registered_ssim takes two 2D images; got shapes {train_image.shape} and {generated_image.shape}"
        )
    return float(register_pairs(train_image[None], generated_image[None], **kwargs).ssim_registered[0])


def apply_transform(
    image, flip: str, rotation_deg: float, shift_px, scale: float, gamma: float = 1.0
) -> np.ndarray:
    """Bring one generated image into register as register_pairs reports it (for display or checking).

    The contrast first (min-max scaled to [0, 1], raised to ``gamma``; 1 leaves it as it is), then
    the geometry: flips and whole-pixel shifts copy pixels; anything else is bicubic, computed exactly
    as during registration. Pixels from outside the image take its minimum (the background of a scan).
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise DeepSSIMError(f"apply_transform takes a 2D image, got shape {image.shape}")
    image = _apply_gamma(image[None], gamma)[0]
    if flip not in FLIPS:
        raise DeepSSIMError(f"flip must be one of {', '.join(FLIPS)}, not {flip!r}")
    flip_index = np.array([FLIPS.index(flip)])
    shift = np.asarray(shift_px, dtype=np.float64).reshape(1, 2)
    if rotation_deg == 0 and scale == 1 and np.all(shift == shift.round()):
        return _exact_transform(image[None], flip_index, shift.round().astype(int))[0]
    z = torch.from_numpy(zscore(image[None])).float()
    background = z.min()
    linear, offset = _sampling_map(flip_index, np.array([rotation_deg]), np.array([scale]), shift)
    with torch.no_grad():
        warped = (
            _warp(
                z - background,
                linear[:, None],
                offset[:, None],
                *_level(image.shape, image.shape, "cpu"),
                image.shape,
                "bicubic",
            )
            + background
        )
    return warped[0, 0].double().numpy() * image.std() + image.mean()


def _check_pairs(train, generated) -> tuple[np.ndarray, np.ndarray]:
    train = np.asarray(train, dtype=np.float64)
    generated = np.asarray(generated, dtype=np.float64)
    if train.shape != generated.shape:
        raise DeepSSIMError(
            f"training and generated images must have one shape, got {train.shape} and {generated.shape}"
        )
    return _check_images(train, generated)


def _check_index(index, size: int) -> np.ndarray:
    index = np.asarray(index)
    if index.ndim != 1 or not (index.dtype.kind in "iu" or len(index) == 0):
        raise DeepSSIMError(f"pair indices must be a 1D integer array, got {index.dtype} {index.shape}")
    index = index.astype(np.int64)
    if len(index) and (index.min() < 0 or index.max() >= size):
        raise DeepSSIMError(f"pair index out of range for {size} images")
    return index


def _check_pair_index(train_index, generated_index, n_train: int, n_generated: int):
    ti, gi = _check_index(train_index, n_train), _check_index(generated_index, n_generated)
    if ti.shape != gi.shape:
        raise DeepSSIMError("train_index and generated_index must have one length")
    return ti, gi


def _check_images(train, generated, settings=None) -> tuple:
    """Both stacks as float64 arrays, checked. With ``settings``, the training images come back as
    :class:`TrainingImages`: an array becomes one; one given is kept with what it has computed (its
    images are checked as it reads them)."""
    given = isinstance(train, TrainingImages)
    if given:
        if settings is None or torch.device(settings.device) != train.device:
            raise DeepSSIMError(f"these training images were prepared for {train.device}, not this device")
        training, train = train, np.zeros((1, *train.full))  # only its shape is checked here
    train = np.ascontiguousarray(train, dtype=np.float64)
    generated = np.ascontiguousarray(generated, dtype=np.float64)
    if train.shape[1:] != generated.shape[1:] or train.ndim != generated.ndim:
        raise DeepSSIMError(
            f"training and generated images must have one size, got {train.shape} and {generated.shape}"
        )
    if train.ndim != 3:
        raise DeepSSIMError(f"expected (N, H, W) stacks of images, got shape {train.shape}")
    if min(train.shape[1:]) < _WINDOW:
        raise DeepSSIMError(f"images are {train.shape[1]}x{train.shape[2]}; SSIM needs at least 7x7")
    if not (np.isfinite(train).all() and np.isfinite(generated).all()):
        raise DeepSSIMError("images contain NaN or Inf values")
    if given:
        return training, generated
    return (train if settings is None else TrainingImages(train, settings.device)), generated


__all__ = [
    "FLIPS",
    "Registration",
    "RegistrationSettings",
    "apply_transform",
    "TrainingImages",
    "register_cascade",
    "register_indexed",
    "register_pairs",
    "registered_ssim",
]
