"""Registered 3D SSIM: the exact 3D SSIM of a generated volume after the rigid transform that best
aligns it to a training volume.

Search space (applied to the *generated* volume, in voxel index space about the volume's centre):
the 8 flips of the three axes (what a generator's flip augmentations can produce), rotation within
+-15 degrees about each axis, shift within +-10% of each side. The transform is: flip, then
rotate about the centre (R = Rz Ry Rx over axes 0, 1, 2), then shift (content moves by ``shift``);
voxels from outside take the volume's minimum (its background).

How (torch, float32, no network):

1. Coarse: both volumes z-scored and area-averaged to ~24 voxels a side; the generated one warped
   once per flip x rotation of a 5 x 5 x 5 grid (7.5 degree steps); every integer shift in range
   scored at once by an FFT cross-correlation; the best few candidates are kept.
2. Refine: local 3 x 3 x 3 rotation grids of halving steps at ~48 and up to 96 voxels a side,
   shifts again by FFT cross-correlation with a parabola through the peak (sub-voxel).
3. Score exactly with the 3D SSIM engine (:mod:`deepssim.ssim.volume`): the identity (plain 3D
   SSIM), the found flip with the shift rounded to whole voxels (voxels copied: no interpolation
   bias), and the found transform by cubic-spline interpolation, which wins only if it beats the
   best exact one by more than ``INTERPOLATION_MARGIN`` (interpolation smooths noise away and so
   inflates SSIM; the margin is measured in ``benchmarks/registered_ssim3d.py``). The result is never
   below plain 3D SSIM and is the exact 3D SSIM of ``apply_rigid(generated, ...)``.

STATUS (issue 28, item 3): work in progress. The transforms (``apply_rigid``, the torch warp) are
tested; the search does not yet recover a (8, -5, 6) degree, (4, -3, 5) voxel move of a smooth
48^3 volume (the correlation it ranks candidates by is not yet discriminative enough), and it takes
~20 s per pair on 2 busy cores. Not used by any command.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from deepssim.errors import DeepSSIMError
from deepssim.ssim.volume import ssim3d_profile

MAX_ROTATION = 15.0  # degrees, about each axis
MAX_SHIFT = 0.10  # of each side
COARSE_SIDE = 24
MEDIUM_SIDE = 48
FINE_SIDE = 96
ROTATION_STEP = 7.5
INTERPOLATION_MARGIN = 0.02
FLIPS = tuple(itertools.product((False, True), repeat=3))


@dataclass
class Registration3D:
    """What 3D registration found for one (training, generated) pair of volumes.

    ssim_registered: the exact 3D SSIM of the aligned generated volume; ssim_plain: without any
    transform. flips, rotation (degrees about axes 0, 1, 2), shift (voxels): the transform, as
    :func:`apply_rigid` takes it (identity when the plain SSIM won); interpolated: whether the
    aligned volume was interpolated (else voxels were only flipped and moved by whole voxels).
    profile: the mean SSIM map of each plane along axis 0 of the aligned pair (D - 6 values;
    entry j is centred on slice j + 3): where along that axis the volumes agree.
    """

    ssim_registered: float
    ssim_plain: float
    flips: tuple[bool, bool, bool] = (False, False, False)
    rotation: tuple[float, float, float] = (0.0, 0.0, 0.0)
    shift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    interpolated: bool = False
    profile: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def describe(self) -> str:
        flips = "".join(axis for axis, on in zip("xyz", self.flips, strict=True) if on) or "none"
        rotation = ",".join(f"{v:.1f}" for v in self.rotation)
        shift = ",".join(f"{v:.1f}" for v in self.shift)
        return f"flip={flips} rot=({rotation}) shift=({shift})"


def rotation_matrix(degrees) -> np.ndarray:
    """R = Rz Ry Rx for rotations (degrees) about axes 0 (x), 1 (y) and 2 (z) of index space."""
    ax, ay, az = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def apply_rigid(
    volume, flips=(False, False, False), rotation=(0.0, 0.0, 0.0), shift=(0.0, 0.0, 0.0), order=3
):
    """The volume flipped, rotated about its centre and shifted (content moves by ``shift``
    voxels); outside voxels take its minimum. order: spline order (3 cubic, 1 trilinear, 0 nearest)."""
    from scipy import ndimage

    volume = np.asarray(volume, dtype=np.float64)
    flipped = np.flip(volume, [axis for axis in range(3) if flips[axis]]) if any(flips) else volume
    if not np.any(rotation) and np.allclose(shift, np.round(shift)):
        return _integer_shift(flipped, np.round(shift).astype(int))
    matrix = rotation_matrix(rotation)
    centre = (np.asarray(volume.shape) - 1) / 2
    inverse = matrix.T  # output p <- input R^T (p - c - s) + c
    offset = centre - inverse @ (centre + np.asarray(shift, dtype=np.float64))
    return ndimage.affine_transform(
        np.ascontiguousarray(flipped), inverse, offset, order=order, mode="constant", cval=float(volume.min())
    )


def _integer_shift(volume: np.ndarray, shift) -> np.ndarray:
    out = np.full_like(volume, volume.min())
    source, target = [], []
    for n, s in zip(volume.shape, shift, strict=True):
        s = int(np.clip(s, -n, n))
        source.append(slice(max(0, -s), n - max(0, s)))
        target.append(slice(max(0, s), n - max(0, -s)))
    out[tuple(target)] = volume[tuple(source)]
    return out


def registered_ssim3d(train, generated, **kwargs) -> float:
    """Registered 3D SSIM of one (training, generated) pair of volumes."""
    return register3d(train, generated, **kwargs).ssim_registered


def register3d(
    train,
    generated,
    *,
    max_rotation: float = MAX_ROTATION,
    max_shift: float = MAX_SHIFT,
    flips: tuple[tuple[bool, bool, bool], ...] = FLIPS,
    candidates: int = 3,
) -> Registration3D:
    """Find the rigid transform (flips, rotation, shift) of ``generated`` that best aligns it to
    ``train`` and return the exact 3D SSIM after it (see the module's docstring)."""
    a = np.ascontiguousarray(train, dtype=np.float64)
    b = np.ascontiguousarray(generated, dtype=np.float64)
    if a.ndim != 3 or b.ndim != 3:
        raise DeepSSIMError(f"3D registration takes two 3D volumes; got shapes {a.shape} and {b.shape}")
    if a.shape != b.shape:
        raise DeepSSIMError(f"3D registration needs two volumes of one shape; got {a.shape} and {b.shape}")
    plain, plain_profile = ssim3d_profile(a, b)
    with torch.no_grad():
        flip, rotation, shift = _search(a, b, max_rotation, max_shift, flips, candidates)
    result = Registration3D(plain, plain, profile=plain_profile)
    rounded = np.round(shift)
    exact = apply_rigid(b, flip, (0.0, 0.0, 0.0), rounded)
    value, profile = ssim3d_profile(a, exact)
    if value > result.ssim_registered:
        result = Registration3D(
            value, plain, flip, (0.0, 0.0, 0.0), tuple(map(float, rounded)), False, profile
        )
    moves = _largest_move(a.shape, rotation, shift - rounded)
    if moves >= 0.25:
        warped = apply_rigid(b, flip, rotation, shift)
        value, profile = ssim3d_profile(a, warped)
        if value > result.ssim_registered + INTERPOLATION_MARGIN:
            result = Registration3D(
                value, plain, flip, tuple(map(float, rotation)), tuple(map(float, shift)), True, profile
            )
    return result


def _largest_move(shape, rotation, residual_shift) -> float:
    """How far (voxels) the rotation plus a residual shift moves the volume's farthest corner."""
    corners = (np.array(list(itertools.product((0, 1), repeat=3))) * (np.asarray(shape) - 1)) - (
        np.asarray(shape) - 1
    ) / 2
    moved = corners @ rotation_matrix(rotation).T + residual_shift
    return float(np.abs(moved - corners).max())


def _zscore_tensor(volume: np.ndarray) -> torch.Tensor:
    z = (volume - volume.mean()) / volume.std()
    return torch.from_numpy(z.astype(np.float32))[None, None]


def _downsample(volume: torch.Tensor, side: int) -> tuple[torch.Tensor, float]:
    """Area-average so the largest side is about ``side``; return (volume, factor)."""
    factor = max(1, int(round(max(volume.shape[2:]) / side)))
    if factor == 1:
        return volume, 1.0
    return F.avg_pool3d(volume, factor, ceil_mode=True), float(factor)


def _theta(shape, flip, rotation, shift) -> torch.Tensor:
    """affine_grid's theta (N, 3, 4) for output voxel p <- source R^T (p - c - s) + c of the
    flipped volume, given as batches of rotations (N, 3) degrees and shifts (N, 3) voxels."""
    n = torch.tensor(shape, dtype=torch.float64)
    centre = (n - 1) / 2
    rotation = torch.as_tensor(rotation, dtype=torch.float64).reshape(-1, 3)
    shift = torch.as_tensor(shift, dtype=torch.float64).reshape(-1, 3)
    return _theta_torch(n, centre, flip, rotation, shift)


def _rotation_torch(radians: torch.Tensor) -> torch.Tensor:
    ax, ay, az = radians.unbind(-1)
    one, zero = torch.ones_like(ax), torch.zeros_like(ax)
    rx = torch.stack([one, zero, zero, zero, ax.cos(), -ax.sin(), zero, ax.sin(), ax.cos()], -1)
    ry = torch.stack([ay.cos(), zero, ay.sin(), zero, one, zero, -ay.sin(), zero, ay.cos()], -1)
    rz = torch.stack([az.cos(), -az.sin(), zero, az.sin(), az.cos(), zero, zero, zero, one], -1)
    shape = (*radians.shape[:-1], 3, 3)
    return rz.reshape(shape) @ ry.reshape(shape) @ rx.reshape(shape)


def _theta_torch(n, centre, flip, rotation_deg, shift) -> torch.Tensor:
    matrix = _rotation_torch(torch.deg2rad(rotation_deg))
    inverse = matrix.transpose(-1, -2)
    flip_sign = torch.tensor([-1.0 if f else 1.0 for f in flip], dtype=n.dtype)
    # source index q in the flipped volume = R^T (p - c - s) + c; in the stored volume a flipped
    # axis reads n - 1 - q, i.e. the normalised coordinate is negated.
    scale = 2 / (n - 1)
    linear = scale[:, None] * inverse / scale[None, :]  # in normalised coordinates
    offset = (
        scale * (centre - (inverse @ (centre + shift)[..., None])[..., 0]) - 1 + linear @ torch.ones_like(n)
    )
    linear = flip_sign[:, None] * linear
    offset = flip_sign * offset
    order = [2, 1, 0]  # grid_sample's coordinates are (x=W, y=H, z=D): reversed
    linear = linear[..., order, :][..., :, order]
    offset = offset[..., order]
    return torch.cat([linear, offset[..., None]], dim=-1)


def _warp(volume: torch.Tensor, theta: torch.Tensor, fill: float) -> torch.Tensor:
    grid = F.affine_grid(theta.to(volume.dtype), [len(theta), 1, *volume.shape[2:]], align_corners=True)
    source = (volume - fill).expand(len(theta), -1, -1, -1, -1)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True) + fill


def _levels(a: np.ndarray, b: np.ndarray, side: int):
    ta, factor = _downsample(_zscore_tensor(a), side)
    tb, _ = _downsample(_zscore_tensor(b), side)
    return ta, tb, factor


def _grid_search(ta, tb, candidates, reach, keep: int):
    """Score every (flip, rotation) of ``candidates`` at every integer shift within ``reach`` (an
    FFT cross-correlation per warp); return the ``keep`` best as (score, flip, rotation, shift),
    one per flip, shifts refined to sub-voxel by a parabola through the peak's neighbours."""
    shape = ta.shape[2:]
    fill = float(tb.min())
    padded = [n + r + 1 for n, r in zip(shape, reach, strict=True)]
    # background (the minimum) at zero, so the FFT's zero padding is background too
    target = ta[0, 0] - ta.min()
    fa = torch.fft.rfftn(target, s=padded).conj()
    scored = []
    by_flip: dict = {}
    for flip, rotation in candidates:
        by_flip.setdefault(flip, []).append(rotation)
    for flip, rotations in by_flip.items():
        rotations = np.asarray(rotations, dtype=np.float64)
        for start in range(0, len(rotations), 32):
            part = rotations[start : start + 32]
            warped = _warp(tb, _theta(shape, flip, part, np.zeros_like(part)), fill)[:, 0] - fill
            correlation = torch.fft.irfftn(fa * torch.fft.rfftn(warped, s=padded), s=padded)
            # correlation[s] = sum_x a(x) g(x + s): g moved by -s matches a
            window = _shift_window(correlation, reach)
            value, index = window.reshape(len(part), -1).max(dim=1)
            for row in range(len(part)):
                peak = np.unravel_index(int(index[row]), window.shape[1:])
                fits = [_subvoxel(window[row], peak, axis) for axis in range(3)]
                shift = np.array([-(o - r) for (o, _), r in zip(fits, reach, strict=True)], dtype=np.float64)
                # the peak's value between voxels, so rotations are not judged by where the true
                # shift falls on the integer grid
                score = float(value[row]) + sum(gain for _, gain in fits)
                scored.append((score, flip, part[row], shift))
    scored.sort(key=lambda item: -item[0])
    kept, seen = [], set()
    for item in scored:
        if item[1] not in seen:
            kept.append(item)
            seen.add(item[1])
        if len(kept) == keep:
            break
    return kept


def _subvoxel(window: torch.Tensor, peak, axis: int) -> tuple[float, float]:
    """(position, gain): the peak along ``axis`` refined by a parabola through it and its
    neighbours, and how much higher the parabola's top is than the peak voxel."""
    i = peak[axis]
    if i == 0 or i == window.shape[axis] - 1:
        return float(i), 0.0
    at = list(peak)
    values = []
    for j in (i - 1, i, i + 1):
        at[axis] = j
        values.append(float(window[tuple(at)]))
    lo, mid, hi = values
    curvature = lo - 2 * mid + hi
    if curvature >= 0:
        return float(i), 0.0
    return i + 0.5 * (lo - hi) / curvature, -((hi - lo) ** 2) / (8 * curvature)


def _shift_window(correlation: torch.Tensor, reach) -> torch.Tensor:
    """The correlation at shifts -reach..reach along each axis (negative shifts wrap around)."""
    out = correlation
    for axis, r in enumerate(reach, start=1):
        out = torch.cat([out.narrow(axis, out.shape[axis] - r, r), out.narrow(axis, 0, r + 1)], dim=axis)
    return out


def _search(a: np.ndarray, b: np.ndarray, max_rotation: float, max_shift: float, flips, keep: int):
    """Coarse to fine: (flip, rotation degrees, shift voxels) of the best alignment found."""
    ta, tb, factor = _levels(a, b, COARSE_SIDE)
    reach = [max(1, int(np.ceil(1.5 * max_shift * n / factor))) for n in a.shape]
    step = max_rotation / 2 if max_rotation > 0 else 0.0
    angles = np.array([-step * 2, -step, 0.0, step, step * 2]) if step else np.zeros(1)
    grid = list(itertools.product(angles, repeat=3))
    found = _grid_search(ta, tb, [(flip, r) for flip in flips for r in grid], reach, keep)
    best = None
    for score, flip, rotation, shift in found:
        shift = shift * factor
        for side, step in (
            (MEDIUM_SIDE, max_rotation / 4),
            (MEDIUM_SIDE, max_rotation / 8),
            (FINE_SIDE, max_rotation / 16),
        ):
            if step <= 0:
                break
            ta_l, tb_l, level_factor = _levels(a, b, side)
            local = [
                np.clip(rotation + np.array(d) * step, -max_rotation, max_rotation)
                for d in itertools.product((-1, 0, 1), repeat=3)
            ]
            reach = [max(1, int(np.ceil(1.5 * max_shift * n / level_factor))) for n in a.shape]
            score, _, rotation, shift = _grid_search(ta_l, tb_l, [(flip, r) for r in local], reach, 1)[0]
            shift = shift * level_factor
        if best is None or score > best[0]:
            best = (score, flip, rotation, shift)
    return best[1:]


__all__ = ["Registration3D", "apply_rigid", "register3d", "registered_ssim3d", "rotation_matrix"]
