"""Registered SSIM: the exact SSIM of a generated image after the rigid transform that best aligns it
to a training image.

Why: a generator that memorised a training image may still emit it flipped, rotated, shifted or
slightly rescaled (the augmentations it was trained with), and plain SSIM then misses the copy. The
search space is the four flips x rotation within +-15 deg x shift within +-10% of the size x isotropic
scale 0.9-1.1, applied to the *generated* image (flip first, then rotation and scale about the image
centre, then shift; content moves by ``shift_px``; pixels from outside take the image's minimum).

How, for a chunk of pairs at a time (torch, float32, no autograd):

1. Coarse: both images are z-scored and area-averaged to ~24 px. The generated image is warped once per
   rotation x scale of a grid (5 deg steps, 3 scales). Correlating a flipped candidate with the
   training image equals correlating the unflipped one with the flipped training image, so the four
   flips cost no warps, and every (flip, rotation, scale, integer shift in range) is scored by one
   grouped convolution plus summed-area tables (the exact Pearson correlation over the frame, fill
   included). Batched FFTs of such tiny images are slower on CPU (several microseconds each in torch,
   numpy and scipy alike) than this.
2. Refine: the best candidate of each of the two best flips goes through inverse-compositional
   Gauss-Newton (Lucas-Kanade) on the similarity transform at ~64 px; the better one through a few more
   steps at full resolution. This gives sub-pixel shifts and ~0.05 deg rotations from a handful of
   warps; steps that overshoot are not kept.
3. Score exactly, with the SSIM engine (``deepssim.ssim.engine``: per-image statistics, then its fused
   C kernel per pair, so no N x N matrix), the identity (plain SSIM), the found flip with the shift
   rounded to whole pixels (pixels copied, not mixed: no bias), and the found transform by bicubic
   interpolation. The interpolated one wins only if it beats the best exact one by more than
   ``INTERPOLATION_MARGIN``. So the result is never below plain SSIM, and it is the exact SSIM of
   ``apply_transform(generated, *transform)``. (``ssim_pairs`` gives the same numbers, but its numpy
   cross term is ~2x slower than the kernel; the engine's ``prepare``, ~3 images per pair, is now the
   larger half of the cost.)

Interpolation bias, measured on slice 30 of ``data/sources/KmeansTest_T1UCharRaw.nii.gz`` (intensities
0-255) with Gaussian noise sigma 2 / 5 / 10 / 20 (plain SSIM of the noisy copy 0.963 / 0.824 / 0.616 /
0.415): the best SSIM over small non-identity transforms (rotation +-0.3 deg, shift +-0.2 px), minus
the plain SSIM, is +0.009 / +0.066 / +0.109 / +0.091 with bilinear resampling, because it averages the
noise away; -0.002 / +0.021 / +0.035 / +0.024 with bicubic; 0 with nearest neighbour. Registering the
same noisy copy after flip + 8 deg rotation + 5 px shift (scipy, cubic spline) gives, relative to the
plain SSIM before the transform, -0.053 / -0.007 / +0.038 / +0.029 with bicubic, -0.056 / +0.013 /
+0.080 / +0.069 with bilinear and -0.082 / -0.046 / -0.007 / -0.009 with nearest neighbour (jagged
edges). Hence bicubic, used only when the rotation, scale or sub-pixel part moves some pixel by
``_TRIVIAL_PX`` or more, and kept only when it gains more than the largest smoothing gain measured.
With this rule aligned noisy copies score exactly their plain SSIM, and misaligned ones (random flip,
+-15 deg, +-8% shift, scale 0.92-1.08, by scipy) their SSIM before misalignment +0.001 on average
(median +0.008: the residual smoothing; upscaled copies that lost detail score up to 0.1 lower); see
``benchmarks/registered_ssim.py``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from deepssim.errors import DeepSSIMError
from deepssim.io.normalise import zscore
from deepssim.ssim.engine import prepare, ssim_prepared_pairs

FLIPS = ("none", "rows", "cols", "both")
# (row, col) signs of each flip, in centred coordinates.
_FLIP_SIGNS = ((1.0, 1.0), (-1.0, 1.0), (1.0, -1.0), (-1.0, -1.0))

COARSE_SIZE = 24  # longer side of the coarse level, in pixels
COARSE_ROTATION_STEP = 5.0  # degrees
COARSE_SCALES = 3  # scales tried at the coarse level (spread over the range)
_REFINED_FLIPS = 2  # flips whose best coarse candidate is refined
GAMMAS = np.exp(np.linspace(np.log(0.4), np.log(2.5), 41))  # contrast changes tried (1.0 included)
MIDDLE_SIZE = 64  # longer side of the level where Gauss-Newton starts
_ITERATIONS = (3, 3)  # Gauss-Newton steps at MIDDLE_SIZE, then at full resolution
# Gauss-Newton samples every other row and column of its level (the gradients still come from the
# whole level): a quarter of the cost, no measurable loss of accuracy.
_SAMPLE_STRIDE = 2
# A transform needing interpolation must beat the best exact candidate by more than bicubic
# smoothing alone can add to a noisy copy (<= 0.035 measured, see the module docstring).
INTERPOLATION_MARGIN = 0.04
# A transform that moves no pixel by more than _TRIVIAL_PX beyond its flip + whole-pixel shift is
# scored as that exact flip + shift; one that moves some pixel by more than _FAR_PX is not compared
# with it (the rounded one is then misaligned by pixels, and no smoothing gain can explain the difference).
_TRIVIAL_PX = 0.25
_FAR_PX = 2.0
_WINDOW = 7  # the SSIM window: images must be at least this large


@dataclass(frozen=True)
class RegistrationSettings:
    """The search space (applied to the generated image) and how to run the search."""

    max_rotation_deg: float = 15.0
    max_shift_fraction: float = 0.10
    scale_range: tuple[float, float] = (0.9, 1.1)
    flips: bool = True
    contrast: bool = True
    device: str = "cpu"
    chunk: int = 128

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
        if not isinstance(self.chunk, int) or isinstance(self.chunk, bool) or self.chunk < 1:
            raise DeepSSIMError(f"chunk must be a positive integer, not {self.chunk!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise DeepSSIMError(f"unknown torch device {self.device!r}") from None


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

    def cells(self, *index) -> list[str]:
        """CSV cells of one pair: registered SSIM, transform, plain SSIM (empty where not computed)."""
        if not self.has(*index):
            return ["", "", ""]
        return [
            f"{self.ssim_registered[index]:.6f}",
            self.transform_text(*index),
            f"{self.ssim_plain[index]:.6f}",
        ]

    def reordered(self, order: np.ndarray) -> Registration:
        """(M, k) pairs with each row's pairs put in ``order`` (as from argsort along axis 1)."""

        def take(values):
            return np.take_along_axis(values, order if values.ndim == 2 else order[..., None], axis=1)

        return Registration(*(take(getattr(self, f.name)) for f in fields(self)))


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
    n = len(train)
    result = Registration(
        ssim_registered=np.empty(n),
        ssim_plain=np.empty(n),
        flip=np.empty(n, dtype=object),
        rotation_deg=np.zeros(n),
        shift_px=np.zeros((n, 2)),
        scale=np.ones(n),
        gamma=np.ones(n),
    )
    original = generated
    if settings.contrast:
        result.gamma = contrast_gamma(train, generated)
        generated = _apply_gamma(generated, result.gamma)
    starts = range(0, n, settings.chunk)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="registering", unit="chunk")
    with torch.no_grad():
        for start in starts:
            part = slice(start, start + settings.chunk)
            _register_chunk(train[part], generated[part], original[part], settings, result, part)
    result.flip = result.flip.astype(str)
    # the untouched image is always a candidate: registered SSIM is never below plain SSIM
    plain = result.ssim_plain
    untouched = plain >= result.ssim_registered
    result.ssim_registered = np.maximum(result.ssim_registered, plain)
    result.flip[untouched] = "none"
    result.rotation_deg[untouched], result.scale[untouched], result.gamma[untouched] = 0.0, 1.0, 1.0
    result.shift_px[untouched] = 0.0
    return result


def contrast_gamma(train: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """Per pair, the gamma (``GAMMAS``) that brings the generated image's intensity quantiles closest
    to the training image's, both min-max scaled to [0, 1] (least squares over 99 quantiles)."""
    levels = np.linspace(0.01, 0.99, 99)
    # every other row and column: a quarter of the pixels estimate 99 quantiles well enough
    target = np.quantile(_unit(train)[:, ::2, ::2].reshape(len(train), -1), levels, axis=1).T  # (n, 99)
    source = np.quantile(_unit(generated)[:, ::2, ::2].reshape(len(generated), -1), levels, axis=1).T
    error = ((source[:, None, :] ** GAMMAS[None, :, None] - target[:, None, :]) ** 2).sum(axis=2)
    return GAMMAS[np.argmin(error, axis=1)]


def _unit(images: np.ndarray) -> np.ndarray:
    low = images.min(axis=(-2, -1), keepdims=True)
    high = images.max(axis=(-2, -1), keepdims=True)
    return (images - low) / np.maximum(high - low, 1e-12)


def _apply_gamma(images: np.ndarray, gamma) -> np.ndarray:
    """Min-max scale to [0, 1] and raise to ``gamma`` (per image); gamma 1 leaves an image as it is."""
    gamma = np.broadcast_to(np.asarray(gamma, dtype=np.float64), (len(images),))
    out = np.array(images, dtype=np.float64)
    change = gamma != 1.0
    out[change] = _unit(out[change]) ** gamma[change][:, None, None]
    return out


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


# --------------------------------------------------------------------------------------------------
# One chunk


def _register_chunk(train, generated, original, settings, result: Registration, part: slice) -> None:
    """Search and score one chunk: ``generated`` is the contrast-registered image, ``original`` the
    untouched one (its SSIM is the plain SSIM; each training image is prepared once for all)."""
    device = torch.device(settings.device)
    t = torch.from_numpy(zscore(train)).float().to(device)
    g = torch.from_numpy(zscore(generated)).float().to(device)
    flip, rotation, scale, shift = _search(t, g, settings)
    n, shape = len(train), train.shape[1:]

    # Exact candidates besides the identity: the flip with the shift rounded to whole pixels, unless the
    # transform moves pixels so far beyond that (_FAR_PX) that it cannot compete; and the interpolated
    # transform, unless it moves no pixel by more than _TRIVIAL_PX beyond the rounded one.
    limit = np.floor(_max_shift(settings, shape))
    whole = np.clip(shift.round(), -limit, limit).astype(int)
    moves = _displacement(rotation, scale, shift, shape)
    need_exact = ((flip != 0) | (whole != 0).any(axis=1)) & (moves < _FAR_PX)
    need_warp = moves >= _TRIVIAL_PX
    changed = result.gamma[part] != 1.0  # contrast-registered images that differ from the original
    candidates = [
        original,
        generated[changed],
        _exact_transform(generated[need_exact], flip[need_exact], whole[need_exact]),
    ]
    if need_warp.any():
        linear, offset = _sampling_map(
            flip[need_warp], rotation[need_warp], scale[need_warp], shift[need_warp]
        )
        gw = g[need_warp]
        gw = gw - gw.amin(dim=(1, 2), keepdim=True)
        rows, cols = _level(shape, shape, device)
        warped = _warp(
            gw, linear[:, None].to(device), offset[:, None].to(device), rows, cols, shape, "bicubic"
        )
        # z-scored intensities less their minimum: SSIM z-scores again, so this scores as the warp of
        # the raw intensities by apply_transform does
        candidates.append(warped[:, 0].double().cpu().numpy())
    owner = np.concatenate(
        [np.arange(n), np.flatnonzero(changed), np.flatnonzero(need_exact), np.flatnonzero(need_warp)]
    )
    scores = _exact_ssim(train, np.concatenate(candidates), owner)

    plain = scores[:n]
    identity = plain.copy()  # the contrast-registered image, not moved
    identity[changed] = scores[n : n + changed.sum()]
    first = n + changed.sum()
    exact = identity.copy()
    exact[need_exact] = scores[first : first + need_exact.sum()]
    interpolated = np.full(n, -np.inf)
    interpolated[need_warp] = scores[first + need_exact.sum() :]
    use_exact = exact > identity
    best = np.maximum(exact, identity)
    use_warp = interpolated > best + INTERPOLATION_MARGIN

    result.ssim_plain[part] = plain
    result.ssim_registered[part] = np.where(use_warp, interpolated, best)
    result.flip[part] = np.where(use_exact | use_warp, np.array(FLIPS, dtype=object)[flip], "none")
    result.rotation_deg[part] = np.where(use_warp, rotation, 0.0)
    result.scale[part] = np.where(use_warp, scale, 1.0)
    result.shift_px[part] = np.where(use_warp[:, None], shift, np.where(use_exact[:, None], whole, 0))


def _exact_ssim(train: np.ndarray, candidates: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """SSIM of (train[owner[j]], candidates[j]) for every j, with the SSIM engine (exact, float64):
    each training image is prepared once for all its candidates, then the matched-pairs kernel."""
    prepared = prepare(train, "train", np.float64)
    return ssim_prepared_pairs(prepared[owner], prepare(candidates, "generated", np.float64))


# --------------------------------------------------------------------------------------------------
# Transforms


def _displacement(rotation_deg, scale, shift, shape) -> np.ndarray:
    """Upper bound (pixels) on how far a transform moves any pixel beyond its flip and whole-pixel shift."""
    radius = math.hypot(*shape) / 2
    fraction = np.abs(shift - np.round(shift)).max(axis=-1)
    return radius * (np.abs(np.radians(rotation_deg)) + np.abs(np.asarray(scale) - 1)) + fraction


def _exact_transform(images: np.ndarray, flip: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Flip and shift each image by whole pixels, filling with its minimum: pixels are copied, not mixed."""
    out = np.empty_like(images)
    height, width = images.shape[1:]
    for i, (image, k, (dr, dc)) in enumerate(zip(images, flip, shift, strict=True)):
        sr, sc = _FLIP_SIGNS[k]
        image = image[:: int(sr), :: int(sc)]
        out[i] = image.min()
        out[i, max(dr, 0) : height + min(dr, 0), max(dc, 0) : width + min(dc, 0)] = image[
            max(-dr, 0) : height + min(-dr, 0), max(-dc, 0) : width + min(-dc, 0)
        ]
    return out


def _flip(images: torch.Tensor, k: int) -> torch.Tensor:
    dims = [d for d, sign in zip((-2, -1), _FLIP_SIGNS[k], strict=True) if sign < 0]
    return images.flip(dims) if dims else images


def _sampling_map(flip, rotation_deg, scale, shift) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine map (L, m) from an output pixel x to its source L x + m in the generated image.

    Coordinates are centred and in full-resolution pixels, (row, col). The transform maps content at
    y (generated) to A D y + t with D the flip and A = scale * R(rotation); so L = D A^-1, m = -L t.
    """
    angle = np.radians(np.asarray(rotation_deg, dtype=np.float64))
    cos, sin = np.cos(angle), np.sin(angle)
    inv_rot = np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], -2)  # R^-1 = R^T
    signs = np.asarray(_FLIP_SIGNS)[np.asarray(flip)]
    linear = signs[:, :, None] * inv_rot / np.asarray(scale, dtype=np.float64)[:, None, None]
    offset = -np.einsum("nij,nj->ni", linear, np.asarray(shift, dtype=np.float64))
    return torch.from_numpy(linear).float(), torch.from_numpy(offset).float()


def _params_from_map(flip, linear: torch.Tensor, offset: torch.Tensor):
    """Inverse of _sampling_map: (rotation_deg, scale, shift) of maps whose flip is known."""
    signs = torch.tensor(_FLIP_SIGNS, dtype=torch.float64, device=linear.device)[torch.as_tensor(flip)]
    inv_a = signs[:, :, None] * linear.double()  # D L = A^-1
    a = torch.linalg.inv(inv_a)
    rotation = torch.rad2deg(torch.atan2(a[:, 1, 0] - a[:, 0, 1], a[:, 0, 0] + a[:, 1, 1]))
    scale = torch.sqrt(torch.linalg.det(a).abs())
    shift = -torch.einsum("nij,nj->ni", a @ torch.diag_embed(signs), offset.double())
    return rotation.cpu().numpy(), scale.cpu().numpy(), shift.cpu().numpy()


def _centres(size: int, full: int, device) -> torch.Tensor:
    """Pixel centres of a level with ``size`` pixels across the full frame, in centred full-res pixels."""
    return (torch.arange(size, device=device, dtype=torch.float32) + 0.5) * (full / size) - full / 2


def _level(shape, full_shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column centres of a level of ``shape`` pixels covering the full frame."""
    return _centres(shape[0], full_shape[0], device), _centres(shape[1], full_shape[1], device)


def _warp(images, linear, offset, rows, cols, full_shape, mode="bilinear") -> torch.Tensor:
    """Sample images (N, h, w) at L x + m for K maps each (linear (N, K, 2, 2), offset (N, K, 2)).

    x runs over the output grid ``rows`` x ``cols`` (centred full-res coordinates); the images cover
    the full frame whatever their resolution, so one map serves every level. Returns (N, K, rows,
    cols); outside the frame the value is 0, so callers pass images minus their background.
    """
    n, k = linear.shape[:2]
    height, width = full_shape
    # grid_sample's normalised coordinates (source * 2 / size, as (col, row)) are affine in the output
    # row and column: a row part plus a column part, broadcast into the grid in one pass
    norm = linear.new_tensor([2 / width, 2 / height])
    lin = linear.flip(-2) * norm[:, None]  # rows of L reordered to (col, row)
    off = offset.flip(-1) * norm
    row_part = rows[:, None, None] * lin[..., None, None, :, 0] + off[..., None, None, :]  # (N, K, h, 1, 2)
    grid = row_part + cols[:, None] * lin[..., None, None, :, 1]  # (N, K, h, w, 2)
    grid = grid.reshape(n, k * len(rows), len(cols), 2)
    out = F.grid_sample(images[:, None], grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.reshape(n, k, len(rows), len(cols))


# --------------------------------------------------------------------------------------------------
# Search


def _max_shift(settings: RegistrationSettings, shape) -> np.ndarray:
    return settings.max_shift_fraction * np.asarray(shape, dtype=np.float64)


def _level_shape(shape, factor: float) -> tuple[int, int]:
    return max(1, round(shape[0] / factor)), max(1, round(shape[1] / factor))


def _search(t: torch.Tensor, g: torch.Tensor, settings: RegistrationSettings):
    """Best (flip index, rotation_deg, scale, shift_px) per pair: coarse grid, then Gauss-Newton."""
    full = tuple(t.shape[1:])
    # Both minus the generated image's background, which is what the warps fill in: the fill is 0.
    fill = g.amin(dim=(1, 2), keepdim=True)
    t, g = t - fill, g - fill
    coarse = _level_shape(full, max(1, round(max(full) / COARSE_SIZE)))
    flip, rotation, scale, shift = _coarse_search(t, g, coarse, settings)
    linear, offset = _sampling_map(
        flip.reshape(-1), rotation.reshape(-1), scale.reshape(-1), shift.reshape(-1, 2)
    )
    n, k = flip.shape
    linear, offset = linear.reshape(n, k, 2, 2).to(t.device), offset.reshape(n, k, 2).to(t.device)

    # Refine each flip's candidate at ~64 px, keep the better, and refine that at full resolution.
    middle = _level_shape(full, max(full) / MIDDLE_SIZE) if max(full) >= 1.75 * MIDDLE_SIZE else full
    stride = _SAMPLE_STRIDE if min(middle) >= 32 else 1
    linear, offset, cost = _gauss_newton(
        _pool(t, middle), _pool(g, middle), linear, offset, full, _ITERATIONS[0], stride
    )
    best = cost.argmin(dim=1)
    pick = torch.arange(n, device=t.device)
    linear, offset = linear[pick, best][:, None], offset[pick, best][:, None]
    flip = flip[np.arange(n), best.cpu().numpy()]
    if middle != full:
        linear, offset, _ = _gauss_newton(t, g, linear, offset, full, _ITERATIONS[1], _SAMPLE_STRIDE)
    rotation, scale, shift = _params_from_map(flip, linear[:, 0], offset[:, 0])
    return flip, *_clamp(rotation, scale, shift, settings, full)


def _clamp(rotation, scale, shift, settings, full):
    low, high = settings.scale_range
    limit = _max_shift(settings, full)
    return (
        np.clip(rotation, -settings.max_rotation_deg, settings.max_rotation_deg),
        np.clip(scale, low, high),
        np.clip(shift, -limit, limit),
    )


def _pool(images: torch.Tensor, shape) -> torch.Tensor:
    return (
        images
        if tuple(images.shape[1:]) == tuple(shape)
        else F.adaptive_avg_pool2d(images[:, None], shape)[:, 0]
    )


def _grid(limit: float, step: float) -> np.ndarray:
    """Symmetric grid over [-limit, limit] with spacing at most ``step``, always containing 0."""
    half = math.ceil(limit / step - 1e-9)
    return np.linspace(-limit, limit, 2 * half + 1) if half else np.zeros(1)


def _coarse_search(t, g, shape, settings):
    """Best coarse candidate of the ``_REFINED_FLIPS`` best flips: arrays (N, K) (and (N, K, 2))."""
    full = tuple(t.shape[1:])
    n, (h, w) = len(t), shape
    rotations = _grid(settings.max_rotation_deg, COARSE_ROTATION_STEP)
    low, high = settings.scale_range
    # the centres of COARSE_SCALES equal cells of the range (1.0 among them for a symmetric range)
    cell = (high - low) / COARSE_SCALES
    scales = (
        low + cell * (np.arange(COARSE_SCALES) + 0.5) if COARSE_SCALES > 1 and cell > 0.01 else np.ones(1)
    )
    rot, sc = (a.reshape(-1) for a in np.meshgrid(rotations, scales, indexing="ij"))
    linear, offset = _sampling_map(np.zeros(len(rot), dtype=int), rot, sc, np.zeros((len(rot), 2)))
    linear = linear.to(t.device).expand(n, -1, -1, -1)
    offset = offset.to(t.device).expand(n, -1, -1)
    candidates = _warp(_pool(g, shape), linear, offset, *_level(shape, full, t.device), full)
    a = _pool(t, shape)
    a = a - a.mean(dim=(1, 2), keepdim=True)
    a = a / a.flatten(1).norm(dim=1).clamp_min(1e-6)[:, None, None]
    flips = range(4) if settings.flips else range(1)
    pr, pc = (math.ceil(settings.max_shift_fraction * s - 1e-9) for s in shape)
    padded = F.pad(torch.stack([_flip(a, k) for k in flips]), (pc, pc, pr, pr))  # (flips, N, ...)
    # dot[f, n, m, i, j] = sum of the training image times candidate m, flipped by f and shifted by
    # (i - pr, j - pc) = the same sum with the flipped training image and the unflipped candidate
    dot = F.conv2d(padded, candidates.reshape(n * len(rot), 1, h, w), groups=n)
    dot = dot.reshape(len(flips), n, len(rot), 2 * pr + 1, 2 * pc + 1)
    # Pearson correlation over the frame: the shifted candidate's sum and sum of squares (its fill is 0)
    score = (dot / _shifted_spread(candidates, pr, pc)[None]).permute(1, 0, 3, 4, 2)  # (N, flips, i, j, M)
    shifts = [(sr, sc_) for sr in range(-pr, pr + 1) for sc_ in range(-pc, pc + 1)]
    best_score, best_index = score.flatten(2).max(dim=2)  # (N, flips)
    k = min(_REFINED_FLIPS, len(flips))
    top = best_score.topk(k, dim=1).indices  # (N, K)
    index = best_index.gather(1, top).cpu().numpy()
    flip = top.cpu().numpy()
    shift_index, warp_index = np.divmod(index, len(rot))
    signs = np.asarray(_FLIP_SIGNS)[flip]  # (N, K, 2)
    step = np.array([full[0] / h, full[1] / w])
    shift = signs * np.asarray(shifts)[shift_index] * step  # t = D s
    rotation = rot[warp_index] * signs[..., 0] * signs[..., 1]  # theta = det(D) phi
    return flip, rotation, sc[warp_index], shift


def _shifted_spread(images: torch.Tensor, pr: int, pc: int) -> torch.Tensor:
    """sqrt(n var) over the frame of each image shifted by (i - pr, j - pc) with zero fill: (..., i, j)."""
    h, w = images.shape[-2:]
    total = F.pad(images.cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    total_sq = F.pad((images * images).cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    rows = torch.arange(-pr, pr + 1, device=images.device)
    cols = torch.arange(-pc, pc + 1, device=images.device)
    r0, r1 = (-rows).clamp_min(0), h - rows.clamp_min(0)  # rows of the image that stay in the frame
    c0, c1 = (-cols).clamp_min(0), w - cols.clamp_min(0)

    def box(table):  # sums over rows [r0, r1) x cols [c0, c1) from a summed-area table
        strip = table.index_select(-2, r1) - table.index_select(-2, r0)
        return strip.index_select(-1, c1) - strip.index_select(-1, c0)

    first, second = box(total), box(total_sq)
    return (second - first * first / (h * w)).clamp_min(1e-6).sqrt()


def _gauss_newton(template, images, linear, offset, full, iterations, stride=1):
    """Inverse-compositional Gauss-Newton on a similarity transform, for K starting maps per pair.

    Minimises the mean squared difference between the template (training image) and the warped image
    at one level, on every ``stride``-th row and column; the template's Jacobian and Hessian are
    computed once (Baker & Matthews, 2004). Returns the best maps seen (a step that overshoots is not
    kept) and their costs, (N, K).
    """
    shape = template.shape[1:]
    rows, cols = (x[::stride] for x in _level(shape, full, template.device))
    spacing = (full[0] / shape[0], full[1] / shape[1])  # level pixels in full-res pixels
    grad_r, grad_c = (d[:, ::stride, ::stride] for d in torch.gradient(template, spacing=spacing, dim=(1, 2)))
    template = template[:, ::stride, ::stride]
    xr, xc = (x.reshape(-1) for x in torch.meshgrid(rows, cols, indexing="ij"))
    gr, gc = grad_r.flatten(1), grad_c.flatten(1)
    # d warp / d (a, b, tr, tc) for warp(x) = [[1 + a, -b], [b, 1 + a]] x + (tr, tc)
    steepest = torch.stack((gr * xr + gc * xc, gc * xr - gr * xc, gr, gc), 1)  # (N, 4, P)
    hessian = torch.einsum("nip,njp->nij", steepest, steepest).double()
    hessian = (
        hessian
        + 1e-6 * torch.diag_embed(hessian.diagonal(dim1=1, dim2=2))
        + 1e-9 * torch.eye(4, device=hessian.device)
    )
    inverse = torch.linalg.inv(hessian).float()
    target = template.flatten(1)[:, None]
    best_linear, best_offset = linear, offset
    best_cost = torch.full(linear.shape[:2], torch.inf, device=linear.device)
    for iteration in range(iterations + 1):
        error = _warp(images, linear, offset, rows, cols, full).flatten(2) - target
        cost = error.square().mean(dim=2)
        better = cost < best_cost
        best_cost = torch.where(better, cost, best_cost)
        best_linear = torch.where(better[..., None, None], linear, best_linear)
        best_offset = torch.where(better[..., None], offset, best_offset)
        if iteration == iterations:
            break
        step = torch.einsum("nij,nkj->nki", inverse, torch.einsum("nip,nkp->nki", steepest, error))
        a, b, tr, tc = step.unbind(-1)
        # compose with the inverse of the step: L <- L W^-1, m <- m - L W^-1 t
        det = (1 + a) ** 2 + b**2
        w_inv = (
            torch.stack((torch.stack((1 + a, b), -1), torch.stack((-b, 1 + a), -1)), -2)
            / det[..., None, None]
        )
        linear = linear @ w_inv
        offset = offset - torch.einsum("nkij,nkj->nki", linear, torch.stack((tr, tc), -1))
    return best_linear, best_offset, best_cost


# --------------------------------------------------------------------------------------------------
# Input checks


def _check_pairs(train, generated) -> tuple[np.ndarray, np.ndarray]:
    train = np.asarray(train, dtype=np.float64)
    generated = np.asarray(generated, dtype=np.float64)
    if train.shape != generated.shape:
        raise DeepSSIMError(
            f"training and generated images must have one shape, got {train.shape} and {generated.shape}"
        )
    if train.ndim != 3:
        raise DeepSSIMError(f"expected (N, H, W) stacks of images, got shape {train.shape}")
    if min(train.shape[1:]) < _WINDOW:
        raise DeepSSIMError(f"images are {train.shape[1]}x{train.shape[2]}; SSIM needs at least 7x7")
    if not (np.isfinite(train).all() and np.isfinite(generated).all()):
        raise DeepSSIMError("images contain NaN or Inf values")
    return train, generated


__all__ = [
    "FLIPS",
    "Registration",
    "RegistrationSettings",
    "apply_transform",
    "register_pairs",
    "registered_ssim",
]
