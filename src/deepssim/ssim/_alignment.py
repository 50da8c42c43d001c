"""The search behind registered SSIM (:mod:`deepssim.ssim.registered`): a coarse grid over flips,
rotations, scales and whole-pixel shifts, inverse-compositional Gauss-Newton refinement, warping,
and the exact scoring rules (``docs/registration.md`` explains each step and its measured bias)."""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from deepssim.errors import DeepSSIMError
from deepssim.ssim.engine import (
    COV_NORM,
    WINDOW,
    TrainingStatistics,
    _in_threads,
    _ssim_kernel,
    _unpreparable,
    ssim_raw_pairs,
)

try:
    from deepssim.ssim import _warp_kernel
except ImportError:  # built without a C compiler: torch's grid_sample warps
    _warp_kernel = None

if TYPE_CHECKING:
    from deepssim.ssim.registered import RegistrationSettings

FLIPS = ("none", "rows", "cols", "both")
# (row, col) signs of each flip, in centred coordinates.
_FLIP_SIGNS = ((1.0, 1.0), (-1.0, 1.0), (1.0, -1.0), (-1.0, -1.0))

COARSE_SIZE = 24  # longer side of the coarse level, in pixels
COARSE_ROTATION_STEP = 5.0  # degrees
COARSE_SCALES = 3  # scales tried at the coarse level (spread over the range)
_REFINED_FLIPS = 2  # flips whose best coarse candidate is refined
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


# What exact SSIM needs of each training image (engine.TrainingStatistics' fields).
_STATISTICS = ("z", "mu", "var", "c1", "c2")

# What the training images' share of registration may keep in memory (~0.5 MB per 136 x 112 image).
TRAINING_CACHE_BYTES = 2 * 2**30


class TrainingImages:
    """What registration computes of each training image, once however many pairs, chunks and calls it
    is in (at 1/10 of the paper's scale a training image is in ~30 pairs, nearly each in another
    chunk): prepared for exact SSIM, z-scored and pooled to the coarse level, its Gauss-Newton
    templates at both levels, and its intensity quantiles for the contrast gamma. Kept in slots up to
    ``budget`` bytes (the most one chunk needs, whatever the budget), the least recently used given up
    first and computed again when needed; pairs refer to training images by slot.

    train: an (N, H, W) array, or images read on demand (an :class:`~deepssim.ImageSet`: a scan's
    training set, each image read when first needed). Pickles as its images alone (a Ray task
    builds its own)."""

    def __init__(self, train, device="cpu", budget: int | None = None) -> None:
        self.train, self.device, self.budget = train, torch.device(device), budget
        self.full = full = tuple(int(x) for x in train.shape[-2:])
        self.coarse_shape = _level_shape(full, max(1, round(max(full) / COARSE_SIZE)))
        middle = max(full) >= 1.75 * MIDDLE_SIZE
        self.middle_shape = _level_shape(full, max(full) / MIDDLE_SIZE) if middle else full
        self.middle_stride = _SAMPLE_STRIDE if min(self.middle_shape) >= 32 else 1
        pixels = full[0] * full[1]
        per_image = 8 * 3 * pixels + 4 * 2 * pixels // 4 * 5  # SSIM statistics, both levels' templates
        budget = TRAINING_CACHE_BYTES if budget is None else budget
        self.capacity = 0
        self.wanted = int(max(1, min(len(train), budget // per_image)))
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # training image -> slot, oldest first
        self.statistics = TrainingStatistics.empty(0, *full)  # for exact SSIM
        self.store: dict[str, torch.Tensor] = {}  # for the search
        self.quantile_of: dict[int, np.ndarray] = {}  # for the contrast gamma

    def __len__(self) -> int:
        return len(self.train)

    def __getstate__(self) -> dict:
        return {"train": self.train, "device": str(self.device), "budget": self.budget}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def raw(self, images: np.ndarray) -> np.ndarray:
        """The raw training images ``images`` (indices), checked: finite and not constant."""
        if isinstance(self.train, np.ndarray):
            raw = self.train[images]
        else:
            raw = np.ascontiguousarray(self.train.take(images), dtype=np.float64)
        flat = raw.reshape(len(raw), -1)
        for row in np.flatnonzero(~np.isfinite(flat).all(axis=1) | (np.ptp(flat, axis=1) == 0)):
            problem = "contains NaN or Inf values" if not np.isfinite(flat[row]).all() else "is constant"
            raise DeepSSIMError(  # (an ImageSet's loader names such a file before this)
                f"training image {images[row]} {problem}: it cannot be z-scored or registered; remove it "
                "from the training set"
            )
        return raw

    def quantiles(self, images: np.ndarray, compute) -> np.ndarray:
        """``compute(raw images)`` of the training images ``images``, each computed once and kept. The
        images read for it are prepared into free slots too, so a file is not read again for them."""
        missing = np.asarray([i for i in images.tolist() if i not in self.quantile_of], dtype=np.int64)
        if len(missing):
            raw = self.raw(missing)
            self.quantile_of.update(zip(missing.tolist(), compute(raw), strict=True))
            self._keep(missing, raw, evict=False)
        return np.stack([self.quantile_of[i] for i in images.tolist()])

    def slots(self, images: np.ndarray) -> np.ndarray:
        """The slots of the training images ``images`` (distinct indices), computing those not kept."""
        images = np.asarray(images, dtype=np.int64)
        for image in images[np.isin(images, list(self.slot_of))]:
            self.slot_of.move_to_end(int(image))
        self._keep(images, evict=True)
        return np.asarray([self.slot_of[int(i)] for i in images], dtype=np.int64)

    def _keep(self, images: np.ndarray, raw=None, evict: bool = True) -> None:
        """Compute into slots those of ``images`` not kept (``raw``: their images, already read).
        ``evict``: all of them, giving up the oldest slots not among ``images`` (and growing past the
        budget if one chunk needs it); otherwise as many as there are free slots."""
        self._grow(min(len(self), max(self.wanted, len(images) if evict else 0)))
        unkept = np.asarray(
            [row for row, i in enumerate(images.tolist()) if i not in self.slot_of], dtype=np.int64
        )
        free = sorted(set(range(self.capacity)) - set(self.slot_of.values()))
        needed = set(images.tolist())
        while evict and len(free) < len(unkept):  # give up the oldest slot not needed now
            free.append(self.slot_of.pop(next(i for i in self.slot_of if i not in needed)))
        unkept = unkept[: len(free)]
        if len(unkept):
            slots = np.asarray(free[: len(unkept)])
            self._compute(images[unkept], slots, None if raw is None else raw[unkept])
            self.slot_of.update(zip(images[unkept].tolist(), slots.tolist(), strict=True))

    def _grow(self, capacity: int) -> None:
        """Room for ``capacity`` training images, keeping those already computed."""
        kept = self.capacity
        if capacity <= kept:
            return
        grown = TrainingStatistics.empty(capacity, *self.full)
        for name in ("z", "mu", "var", "c1", "c2"):
            getattr(grown, name)[:kept] = getattr(self.statistics, name)
        self.statistics, self.capacity = grown, capacity
        for name, values in self.store.items():
            if not name.endswith((".rows", ".cols")):
                self.store[name] = torch.cat([values, values.new_empty((capacity - kept, *values.shape[1:]))])

    @property
    def tensor_path(self) -> bool:
        """Whether torch scores the candidates (on a GPU, or without the C kernel): the GPU's code
        path, which the CPU runs too when the kernel is missing (so tests can check it)."""
        return _ssim_kernel is None or self.device.type != "cpu"

    def ssim_statistics(self) -> tuple[torch.Tensor, ...]:
        """The prepared training images as tensors on the device, (z, mu, var, c1, c2) per slot (on
        the CPU views of ``statistics``, not copies)."""
        if self.device.type == "cpu":
            return tuple(torch.from_numpy(getattr(self.statistics, name)) for name in _STATISTICS)
        return tuple(self.store[f"ssim.{name}"] for name in _STATISTICS)

    def _compute(self, images: np.ndarray, slots: np.ndarray, raw=None) -> None:
        self.statistics.put(slots, self.raw(images) if raw is None else raw)
        if self.device.type != "cpu":  # the tensor path's copy on the device
            for name in _STATISTICS:
                self._put(
                    f"ssim.{name}",
                    slots,
                    torch.from_numpy(getattr(self.statistics, name)[slots]).to(self.device),
                )
        z = torch.from_numpy(self.statistics.z[slots]).float().to(self.device)
        a = _pool(z, self.coarse_shape)
        a = a - a.mean(dim=(1, 2), keepdim=True)
        self._put("coarse", slots, a / a.flatten(1).norm(dim=1).clamp_min(1e-6)[:, None, None])
        levels = {"middle": (_pool(z, self.middle_shape), self.middle_stride)}
        if self.middle_shape != self.full:
            levels["full"] = (z, _SAMPLE_STRIDE)
        for level, (images_at_level, stride) in levels.items():
            template, steepest, inverse, rows, cols = _templates(images_at_level, self.full, stride)
            self._put(f"{level}.template", slots, template.flatten(1))
            self._put(f"{level}.steepest", slots, steepest)
            self._put(f"{level}.inverse", slots, inverse)
            self.store[f"{level}.rows"], self.store[f"{level}.cols"] = rows, cols

    def _put(self, name: str, slots: np.ndarray, values: torch.Tensor) -> None:
        if name not in self.store:
            self.store[name] = values.new_empty((self.capacity, *values.shape[1:]))
        self.store[name][torch.from_numpy(slots).to(values.device)] = values

    def templates(self, level: str) -> tuple:
        """The Gauss-Newton templates of every slot at ``level`` ("middle" or "full"), as
        :func:`_gauss_newton` takes them."""
        names = ("template", "steepest", "inverse", "rows", "cols")
        return tuple(self.store[f"{level}.{name}"] for name in names)


class ChunkImages:
    """The generated images of one chunk of pairs, each once however many pairs it is in.

    training: the call's :class:`TrainingImages`; contrast (Nc, H, W): contrast-registered generated
    images, and ``contrast_z`` those z-scored in float32; original (No, H, W): untouched generated
    images (their SSIM is the plain SSIM); ``pairs`` (3, n): each pair's training slot and its row in
    contrast and original; ``changed`` (Nc,): the contrast image differs from its original."""

    def __init__(self, training: TrainingImages, contrast, contrast_z, original, pairs, changed) -> None:
        self.training, self.contrast, self.original, self.changed = training, contrast, original, changed
        self.contrast_z = torch.from_numpy(contrast_z).to(training.device)
        self.pairs = tuple(np.asarray(p) for p in pairs)
        self.device = training.device
        if training.tensor_path:  # candidates are made and scored on the device
            self.contrast, self.original = (torch.from_numpy(x).to(self.device) for x in (contrast, original))


def _or_plain(identity: np.ndarray, plain: np.ndarray) -> np.ndarray:
    """The contrast-only SSIM, the plain SSIM where the contrast image is the original (NaN)."""
    return np.where(np.isnan(identity), plain, identity)


def _register_chunk(images: ChunkImages, settings, result, part) -> None:
    """Search and score every pair of the chunk and write their results into ``result[part]``."""
    pt, pc, po = images.pairs
    contrast, device = images.contrast, images.device
    g = images.contrast_z
    flip, rotation, scale, shift = _search(images.training, g, pt, pc, settings)
    n, shape = len(pt), images.training.full

    # Exact candidates besides the identity: the flip with the shift rounded to whole pixels, unless the
    # transform moves pixels so far beyond that (_FAR_PX) that it cannot compete; and the interpolated
    # transform, unless it moves no pixel by more than _TRIVIAL_PX beyond the rounded one.
    limit = np.floor(_max_shift(settings, shape))
    whole = np.clip(shift.round(), -limit, limit).astype(int)
    moves = _displacement(rotation, scale, shift, shape)
    need_exact = ((flip != 0) | (whole != 0).any(axis=1)) & (moves < _FAR_PX)
    need_warp = moves >= _TRIVIAL_PX
    # (pairs, their raw images, rows of those) per kind of candidate, scored together below
    moved = np.flatnonzero(images.changed[pc])  # pairs whose contrast image differs from the original
    kinds = {"plain": (np.arange(n), images.original, po), "identity": (moved, contrast, pc[moved])}
    if need_exact.any():
        which = np.flatnonzero(need_exact)
        moved_exactly = _exact_transform(contrast, flip[which], whole[which], pc[which])
        kinds["exact"] = (which, moved_exactly, np.arange(len(which)))
    if need_warp.any():
        which = np.flatnonzero(need_warp)
        linear, offset = _sampling_map(flip[which], rotation[which], scale[which], shift[which])
        gw = g[torch.from_numpy(pc[which]).to(device)]
        gw = gw - gw.amin(dim=(1, 2), keepdim=True)
        linear, offset = linear[:, None].to(device), offset[:, None].to(device)
        warped = _warp(gw, linear, offset, *_level(shape, shape, device), shape, "bicubic")
        # z-scored intensities less their minimum: SSIM z-scores again, so this scores as the warp of
        # the raw intensities by apply_transform does
        warped = warped[:, 0].double()
        kinds["interpolated"] = (
            which,
            warped if images.training.tensor_path else warped.cpu().numpy(),
            np.arange(len(which)),
        )
    scores = _score_candidates(images.training, pt, kinds)
    plain, identity = scores["plain"], _or_plain(scores["identity"], scores["plain"])
    exact = np.where(need_exact, scores.get("exact", identity), identity)
    interpolated = np.where(need_warp, scores.get("interpolated", -np.inf), -np.inf)
    use_exact = exact > identity
    best = np.maximum(exact, identity)
    use_warp = interpolated > best + INTERPOLATION_MARGIN

    result.ssim_plain[part] = plain
    result.ssim_registered[part] = np.where(use_warp, interpolated, best)
    result.flip[part] = np.where(use_exact | use_warp, np.array(FLIPS, dtype=object)[flip], "none")
    result.rotation_deg[part] = np.where(use_warp, rotation, 0.0)
    result.scale[part] = np.where(use_warp, scale, 1.0)
    result.shift_px[part] = np.where(use_warp[:, None], shift, np.where(use_exact[:, None], whole, 0))


def _score_candidates(training: TrainingImages, train_rows, kinds: dict) -> dict[str, np.ndarray]:
    """Exact SSIM of each kind's candidates against their pairs' training images (slots): {kind: (n,)
    array, NaN for pairs without that candidate}. ``kinds``: {kind: (pairs, raw images, their rows)}.
    The C kernel scores a pair's candidates one after another, so its training image's prepared
    statistics are read from memory once and from cache for the others (reading them bounds a
    pair's SSIM); the tensor path scores them in batches on the device."""
    n = len(train_rows)
    if not kinds:
        return {}
    if training.tensor_path:
        statistics = training.ssim_statistics()
        scored = [
            _ssim_raw_torch(statistics, train_rows[pairs], raw, rows) for pairs, raw, rows in kinds.values()
        ]
        values = torch.cat(scored).cpu().numpy()
    else:
        pair_of = np.concatenate([pairs for pairs, _, _ in kinds.values()])
        stack_of = np.concatenate([np.full(len(pairs), k) for k, (pairs, _, _) in enumerate(kinds.values())])
        raw_rows = np.concatenate([np.asarray(rows, dtype=np.int64) for _, _, rows in kinds.values()])
        order = np.argsort(pair_of, kind="stable")
        values = np.empty(len(order))
        stacks = [raw for _, raw, _ in kinds.values()]
        values[order] = ssim_raw_pairs(
            training.statistics, stacks, train_rows[pair_of[order]], raw_rows[order], stack_of[order]
        )
    out, start = {}, 0
    for kind, (pairs, _, _) in kinds.items():
        out[kind] = np.full(n, np.nan)
        out[kind][pairs] = values[start : start + len(pairs)]
        start += len(pairs)
    return out


# Candidates the tensor path scores at once: ~1 GB of float64 temporaries at 136 x 112.
_TORCH_CANDIDATES = 1024


def _ssim_raw_torch(statistics, slots, raw, rows) -> torch.Tensor:
    """:func:`~deepssim.ssim.engine.ssim_raw_pairs` with tensor ops, in float64 on the training
    images' device: SSIM of (training slot ``slots[p]``, ``raw[rows[p]]``), each raw image z-scored
    on its own (population sd). ``raw``: an array or a tensor. The same formula as the C kernel,
    summed in another order (agrees to ~1e-13)."""
    z, mu, var, c1, c2 = statistics
    slots, rows = np.asarray(slots, dtype=np.int64), np.asarray(rows, dtype=np.int64)
    out = []
    for start in range(0, len(slots), _TORCH_CANDIDATES):
        part = slice(start, start + _TORCH_CANDIDATES)
        slot = torch.from_numpy(slots[part]).to(z.device)
        if isinstance(raw, torch.Tensor):
            x = raw[torch.from_numpy(rows[part]).to(raw.device)].to(z.device, torch.float64)
        else:  # only the rows needed go to the device
            x = torch.from_numpy(np.asarray(raw[rows[part]], dtype=np.float64)).to(z.device)
        x = x - x.mean(dim=(1, 2), keepdim=True)
        sd = x.square().mean(dim=(1, 2), keepdim=True).sqrt()
        bad = ~torch.isfinite(sd.flatten()) | (sd.flatten() == 0)
        if bool(bad.any()):  # named by its row, as the C kernel's error does
            first = int(torch.nonzero(bad)[0])
            row = int(rows[start + first]) + 1
            raise _unpreparable(row if bool(torch.isfinite(sd.flatten()[first])) else -row, "generated")
        x = x / sd
        box = functools.partial(F.avg_pool2d, kernel_size=WINDOW, stride=1)
        means = box(torch.stack((x, x * x, z[slot] * x), 1))  # 7x7 means of b, b^2 and a b
        mean_b, mean_bb, mean_ab = means.unbind(1)
        mean_a, c1_, c2_ = mu[slot], c1[slot, None, None], c2[slot, None, None]
        product = mean_a * mean_b
        numerator = (2 * product + c1_) * (2 * COV_NORM * (mean_ab - product) + c2_)
        denominator = (mean_a * mean_a + c1_ + mean_b * mean_b) * (
            var[slot] + COV_NORM * (mean_bb - mean_b * mean_b)
        )
        out.append((numerator / denominator).mean(dim=(1, 2)))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64, device=z.device)


# --------------------------------------------------------------------------------------------------
# Transforms


def _displacement(rotation_deg, scale, shift, shape) -> np.ndarray:
    """Upper bound (pixels) on how far a transform moves any pixel beyond its flip and whole-pixel shift."""
    radius = math.hypot(*shape) / 2
    fraction = np.abs(shift - np.round(shift)).max(axis=-1)
    return radius * (np.abs(np.radians(rotation_deg)) + np.abs(np.asarray(scale) - 1)) + fraction


def _exact_transform(images, flip: np.ndarray, shift: np.ndarray, rows=None):
    """Flip and shift each image (of ``images[rows]``) by whole pixels, filling with its minimum: pixels
    are copied, not mixed. FLIPS' index k flips rows by its bit 0 and columns by its bit 1. An array
    gives an array; a tensor (the tensor path) a tensor on its device."""
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    if isinstance(images, torch.Tensor):
        return _exact_transform_torch(images, flip, shift, rows)
    height, width = images.shape[1:]
    out = np.empty((len(rows), height, width))
    if _ssim_kernel is not None and images.dtype == np.float64 and images.flags.c_contiguous:
        rows, flip, shift = (np.ascontiguousarray(a, dtype=np.int64) for a in (rows, flip, shift))

        def run(start: int, stop: int) -> None:
            part = slice(start, stop)
            _ssim_kernel.exact_transforms(
                images, rows[part], flip[part], shift[part], out[part], stop - start, height, width
            )

        _in_threads(len(rows), run, minimum=4)
        return out
    for i, (image, k, (dr, dc)) in enumerate(zip(images[rows], flip, shift, strict=True)):
        sr, sc = _FLIP_SIGNS[k]
        image = image[:: int(sr), :: int(sc)]
        out[i] = image.min()
        out[i, max(dr, 0) : height + min(dr, 0), max(dc, 0) : width + min(dc, 0)] = image[
            max(-dr, 0) : height + min(-dr, 0), max(-dc, 0) : width + min(-dc, 0)
        ]
    return out


def _exact_transform_torch(images: torch.Tensor, flip, shift, rows) -> torch.Tensor:
    """:func:`_exact_transform` of a tensor, on its device: each output pixel copies the source pixel
    it comes from (gathered by row, then by column), the minimum where that is outside."""
    height, width = images.shape[1:]
    device = images.device
    flip, shift, rows = (
        torch.as_tensor(np.asarray(x, dtype=np.int64)).to(device) for x in (flip, shift, rows)
    )

    def source(size: int, sign_bit: int, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(size, device=device) - offset[:, None]  # in the flipped image
        inside = (index >= 0) & (index < size)
        flipped = (flip & sign_bit).bool()[:, None]
        index = torch.where(flipped, size - 1 - index, index).clamp(0, size - 1)
        return index, inside

    row_index, row_inside = source(height, 1, shift[:, 0])
    col_index, col_inside = source(width, 2, shift[:, 1])
    chosen = images[rows]
    moved = chosen.gather(1, row_index[:, :, None].expand(-1, -1, width))
    moved = moved.gather(2, col_index[:, None, :].expand(-1, height, -1))
    inside = row_inside[:, :, None] & col_inside[:, None, :]
    return torch.where(inside, moved, chosen.amin(dim=(1, 2))[:, None, None])


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
    grid_sample computes it; on the CPU in float32 the C kernel ``_warp_kernel.c`` computes the same
    values (bit for bit with this torch's rounding, see :func:`_fused`) without building the grid.
    """
    lin, off = _normalised(linear, offset, full_shape)
    if (
        _warp_kernel is not None
        and mode in ("bilinear", "bicubic")
        and all(x.device.type == "cpu" and x.dtype == torch.float32 for x in (images, lin, rows, cols))
    ):
        return _warp_c(images, lin, off, rows, cols, mode, _fused(mode))
    return _warp_torch(images, lin, off, rows, cols, mode)


def _normalised(linear, offset, full_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The map in grid_sample's normalised coordinates (source * 2 / size, as (col, row)): the grid is
    rows[i] * lin[..., 0] + off + cols[j] * lin[..., 1], a row part plus a column part."""
    height, width = full_shape
    norm = linear.new_tensor([2 / width, 2 / height])
    return linear.flip(-2) * norm[:, None], offset.flip(-1) * norm  # rows of L reordered to (col, row)


def _warp_torch(images, lin, off, rows, cols, mode) -> torch.Tensor:
    """_warp by grid_sample, the grid broadcast from its row part and its column part in one pass."""
    n, k = lin.shape[:2]
    row_part = rows[:, None, None] * lin[..., None, None, :, 0] + off[..., None, None, :]  # (N, K, h, 1, 2)
    grid = row_part + cols[:, None] * lin[..., None, None, :, 1]  # (N, K, h, w, 2)
    grid = grid.reshape(n, k * len(rows), len(cols), 2)
    out = F.grid_sample(images[:, None], grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.reshape(n, k, len(rows), len(cols))


def _warp_c(images, lin, off, rows, cols, mode, fused: bool) -> torch.Tensor:
    """_warp by the C kernel (bilinear or bicubic), the images split among torch's threads."""
    (n, h, w), k = images.shape, lin.shape[1]
    arrays = [x.detach().contiguous().numpy() for x in (images, lin, off, rows, cols)]
    out = torch.empty((n, k, len(rows), len(cols)), dtype=torch.float32)
    buffer, shape = out.numpy(), (k, h, w, len(rows), len(cols))

    def run(start: int, stop: int) -> int:
        return _warp_kernel.warp(*arrays, buffer, start, stop, *shape, mode == "bicubic", fused)

    if any(_in_threads(n, run, minimum=4)):
        raise MemoryError("the warp kernel could not allocate its workspace")
    return out


@functools.cache
def _fused(mode: str) -> bool:
    """Whether this torch's grid_sample rounds as the kernel's fused variant (its AVX2 and AVX-512
    kernels fuse some multiply-adds; its scalar kernel fuses none): the variant that matches it
    better on a small fixed case (exactly, where it is one of the two)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn((2, 13, 11), generator=generator)
    linear, offset = _sampling_map([1, 2], [7.0, -11.0], [1.07, 0.93], np.array([[1.3, -2.2], [0.4, 0.7]]))
    lin, off = _normalised(linear[:, None], offset[:, None], (40, 36))
    rows, cols = _level((19, 17), (40, 36), "cpu")
    reference = _warp_torch(images, lin, off, rows, cols, mode)
    fused, plain = (
        (_warp_c(images, lin, off, rows, cols, mode, f) - reference).abs().max() for f in (True, False)
    )
    return bool(fused <= plain)


# --------------------------------------------------------------------------------------------------
# Search


def _max_shift(settings: RegistrationSettings, shape) -> np.ndarray:
    return settings.max_shift_fraction * np.asarray(shape, dtype=np.float64)


def _level_shape(shape, factor: float) -> tuple[int, int]:
    return max(1, round(shape[0] / factor)), max(1, round(shape[1] / factor))


def _search(training: TrainingImages, g, pt, pc, settings):
    """Best (flip index, rotation_deg, scale, shift_px) per pair (training slot pt[p], g[pc[p]]): coarse
    grid, then Gauss-Newton. g: z-scored generated images, each once however many pairs it is in."""
    full = training.full
    n = len(pt)
    pt_t, pc_t = (torch.from_numpy(np.asarray(x, dtype=np.int64)).to(g.device) for x in (pt, pc))
    # Both minus the generated image's background, which is what the warps fill in: the fill is 0.
    fill = g.amin(dim=(1, 2))
    g = g - fill[:, None, None]
    flip, rotation, scale, shift = _coarse_search(training, g, pt_t, pc_t, settings)
    linear, offset = _sampling_map(
        flip.reshape(-1), rotation.reshape(-1), scale.reshape(-1), shift.reshape(-1, 2)
    )
    k = flip.shape[1]
    linear, offset = linear.reshape(n, k, 2, 2).to(g.device), offset.reshape(n, k, 2).to(g.device)
    pair_fill = fill[pc_t]

    # Refine each flip's candidate at ~64 px, keep the better, and refine that at full resolution.
    linear, offset, cost = _gauss_newton(
        training.templates("middle"),
        pt_t,
        pair_fill,
        _pool(g, training.middle_shape),
        pc_t,
        linear,
        offset,
        full,
        _ITERATIONS[0],
    )
    best = cost.argmin(dim=1)
    pick = torch.arange(n, device=g.device)
    linear, offset = linear[pick, best][:, None], offset[pick, best][:, None]
    chosen = best.cpu().numpy()
    flip = flip[np.arange(n), chosen]
    if training.middle_shape != full:
        linear, offset, _ = _gauss_newton(
            training.templates("full"), pt_t, pair_fill, g, pc_t, linear, offset, full, _ITERATIONS[1]
        )
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
    """Adaptive average pooling of (N, h, w) images to ``shape``: on the CPU in float32 the warp
    kernel's, bit for bit torch's and ~2x faster, the images split among threads."""
    if tuple(images.shape[1:]) == tuple(shape):
        return images
    if _warp_kernel is None or images.device.type != "cpu" or images.dtype != torch.float32:
        return F.adaptive_avg_pool2d(images[:, None], shape)[:, 0]
    images = images.contiguous()
    out = torch.empty((len(images), *shape), dtype=torch.float32)
    source, target = images.numpy(), out.numpy()

    def run(start: int, stop: int) -> int:
        return _warp_kernel.pool(source, target, start, stop, *images.shape[1:], *shape)

    if any(_in_threads(len(images), run, minimum=4)):
        raise MemoryError("the pooling kernel could not allocate its workspace")
    return out


def _grid(limit: float, step: float) -> np.ndarray:
    """Symmetric grid over [-limit, limit] with spacing at most ``step``, always containing 0."""
    half = math.ceil(limit / step - 1e-9)
    return np.linspace(-limit, limit, 2 * half + 1) if half else np.zeros(1)


def _coarse_search(training: TrainingImages, g, pt, pc, settings):
    """Best coarse candidate of the ``_REFINED_FLIPS`` best flips of each pair (training slot pt, g[pc])
    by Pearson correlation at the coarse level: flip, rotation, scale (N, K) and shift (N, K, 2)."""
    full, shape = training.full, training.coarse_shape
    h, w = shape
    rotations = _grid(settings.max_rotation_deg, COARSE_ROTATION_STEP)
    low, high = settings.scale_range
    # the centres of COARSE_SCALES equal cells of the range (1.0 among them for a symmetric range)
    cell = (high - low) / COARSE_SCALES
    scales = (
        low + cell * (np.arange(COARSE_SCALES) + 0.5) if COARSE_SCALES > 1 and cell > 0.01 else np.ones(1)
    )
    rot, sc = (a.reshape(-1) for a in np.meshgrid(rotations, scales, indexing="ij"))
    linear, offset = _sampling_map(np.zeros(len(rot), dtype=int), rot, sc, np.zeros((len(rot), 2)))
    linear = linear.to(g.device).expand(len(g), -1, -1, -1)
    offset = offset.to(g.device).expand(len(g), -1, -1)
    # every generated image is warped once, for all its pairs
    warped = _warp(_pool(g, shape), linear, offset, *_level(shape, full, g.device), full)
    flips = range(4) if settings.flips else range(1)
    pr, pc_ = (math.ceil(settings.max_shift_fraction * s - 1e-9) for s in shape)
    best_score, best_index = _coarse_scores(training.store["coarse"], pt, warped, pc, pr, pc_, len(flips))
    shifts = [(sr, sc_) for sr in range(-pr, pr + 1) for sc_ in range(-pc_, pc_ + 1)]
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


def _coarse_scores(coarse, pt, warped, pc, pr: int, pc_: int, flips: int):
    """Each pair's best Pearson correlation at the coarse level, per flip, and where it is: (N,
    flips) each; the index runs over (row shift, column shift, candidate). Pair p correlates its
    training image ``coarse[pt[p]]`` (zero mean, unit norm), flipped, with every candidate of
    ``warped[pc[p]]`` (Ng, M, h, w; fill 0) shifted by up to (pr, pc_) whole pixels. The C kernel
    computes it on the CPU in float32 (3.3x torch's grouped convolution here), torch elsewhere."""
    n, (m, h, w) = len(pt), warped.shape[1:]
    arrays = (coarse, warped)
    if _ssim_kernel is not None and all(x.device.type == "cpu" and x.dtype == torch.float32 for x in arrays):
        best = torch.empty((n, flips), dtype=torch.float32)
        index = torch.empty((n, flips), dtype=torch.int64)
        inputs = [x.contiguous().numpy() for x in (coarse, pt, warped, pc)]

        def run(start: int, stop: int) -> int:
            shape = (m, h, w, pr, pc_, flips)
            return _ssim_kernel.coarse_scores(*inputs, best.numpy(), index.numpy(), start, stop, *shape)

        if any(_in_threads(n, run, minimum=4)):
            raise MemoryError("the coarse search kernel could not allocate its workspace")
        return best, index
    a = coarse[pt]  # each pair's training image, z-scored, pooled, unit norm
    padded = F.pad(torch.stack([_flip(a, k) for k in range(flips)]), (pc_, pc_, pr, pr))  # (flips, N, ...)
    spread = _shifted_spread(warped, pr, pc_)  # (Ng, M, i, j)
    # dot[f, n, m, i, j] = sum of the training image times candidate m, flipped by f and shifted by
    # (i - pr, j - pc) = the same sum with the flipped training image and the unflipped candidate
    dot = F.conv2d(padded, warped[pc].reshape(n * m, 1, h, w), groups=n)
    dot = dot.reshape(flips, n, m, 2 * pr + 1, 2 * pc_ + 1)
    # Pearson correlation over the frame: the shifted candidate's sum and sum of squares (its fill is 0)
    score = (dot / spread[pc][None]).permute(1, 0, 3, 4, 2)  # (N, flips, i, j, M)
    return score.flatten(2).max(dim=2)


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


def _templates(template, full, stride) -> tuple:
    """What inverse-compositional Gauss-Newton needs of each template image (N, h, w) of one level,
    computed once for all its pairs: the sampled template, its steepest-descent images (N, 4, P),
    its inverse Hessian (N, 4, 4) and the sampled rows and columns (Baker & Matthews, 2004)."""
    shape = template.shape[1:]
    rows, cols = (x[::stride] for x in _level(shape, full, template.device))
    spacing = (full[0] / shape[0], full[1] / shape[1])  # level pixels in full-res pixels
    grad_r, grad_c = (d[:, ::stride, ::stride] for d in torch.gradient(template, spacing=spacing, dim=(1, 2)))
    template = template[:, ::stride, ::stride]
    xr, xc = (x.reshape(-1) for x in torch.meshgrid(rows, cols, indexing="ij"))
    gr, gc = grad_r.flatten(1), grad_c.flatten(1)
    # d warp / d (a, b, tr, tc) for warp(x) = [[1 + a, -b], [b, 1 + a]] x + (tr, tc)
    steepest = torch.stack((gr * xr + gc * xc, gc * xr - gr * xc, gr, gc), 1)  # (Nt, 4, P)
    hessian = torch.einsum("nip,njp->nij", steepest, steepest).double()
    hessian = (
        hessian
        + 1e-6 * torch.diag_embed(hessian.diagonal(dim1=1, dim2=2))
        + 1e-9 * torch.eye(4, device=hessian.device)
    )
    return template, steepest, torch.linalg.inv(hessian).float(), rows, cols


def _gauss_newton(templates, owner, fill, images, image_of, linear, offset, full, iterations):
    """Inverse-compositional Gauss-Newton on a similarity transform, for K starting maps per pair.

    Pair p's template is ``template[owner[p]] - fill[p]`` (a training image less its generated
    image's background; ``templates`` from :func:`_templates`) and its image ``images[image_of[p]]``.
    Minimises the mean squared difference between the template and the warped image at one level,
    on the sampled rows and columns. Returns the best maps seen (a step that overshoots is not
    kept) and their costs, (N, K).
    """
    template, steepest, inverse, rows, cols = templates
    arrays = (template, steepest, inverse, rows, cols, fill, images, linear, offset)
    if _warp_kernel is not None and all(x.device.type == "cpu" and x.dtype == torch.float32 for x in arrays):
        return _gauss_newton_c(templates, owner, fill, images, image_of, linear, offset, full, iterations)
    inverse, steepest, images = inverse[owner], steepest[owner], images[image_of]
    target = (template.flatten(1)[owner] - fill[:, None])[:, None]
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


def _gauss_newton_c(templates, owner, fill, images, image_of, linear, offset, full, iterations):
    """:func:`_gauss_newton` by the C kernel: each pair's iterations in one call, in cache, the pairs
    split among torch's threads; templates and images are read where they are, not gathered per pair."""
    n, k = linear.shape[:2]
    linear, offset = linear.detach().clone().contiguous(), offset.detach().clone().contiguous()
    cost = torch.empty((n, k), dtype=torch.float32)
    inputs = (*templates, owner.to(torch.int64), fill, images, image_of.to(torch.int64))
    template, steepest, inverse, rows, cols, owner, fill, images, image_of = (
        x.contiguous().numpy() for x in inputs
    )
    arrays = (template, steepest, inverse, rows, cols, owner, fill, images, image_of)
    shape = (k, *images.shape[1:], len(rows), len(cols), *full, iterations, _fused("bilinear"))
    buffers = (linear.numpy(), offset.numpy(), cost.numpy())

    def run(start: int, stop: int) -> int:
        return _warp_kernel.gauss_newton(*arrays, *buffers, start, stop, *shape)

    if any(_in_threads(n, run, minimum=4)):
        raise MemoryError("the Gauss-Newton kernel could not allocate its workspace")
    return linear, offset, cost


# --------------------------------------------------------------------------------------------------
# Input checks
