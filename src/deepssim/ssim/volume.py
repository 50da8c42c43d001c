"""Exact 3D SSIM: the paper's SSIM rule carried to volumes.

Each volume is z-scored on its own; ``data_range`` is max - min of the z-scored *training*
volume; then scikit-image's ``structural_similarity`` for 3D arrays with its defaults: a 7x7x7
uniform window, sample covariance (N/(N-1) with N = 343), K1 = 0.01, K2 = 0.03, and the mean of
the SSIM map with a (7-1)/2 = 3 voxel border cropped on every side, which keeps exactly the
windows that lie inside the volume. So ``ssim3d(a, b)`` equals
``structural_similarity(za, zb, data_range=za.max() - za.min())``.

A C kernel (``_volume_kernel.c``) computes it with separable sliding box sums in double, planes
split among threads; without a compiler NumPy does the same with cumulative sums.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from threading import Lock

import numpy as np

from deepssim.errors import DeepSSIMError

try:
    from deepssim.ssim import _volume_kernel as _kernel
except ImportError:  # built without a C compiler: NumPy serves
    _kernel = None

WINDOW = 7
K1 = 0.01
K2 = 0.03
VOXELS = WINDOW**3
COV_NORM = VOXELS / (VOXELS - 1)


def ssim3d(a, b) -> float:
    """3D SSIM of one (train ``a``, generated ``b``) pair of volumes of raw intensities."""
    return ssim3d_profile(a, b)[0]


def ssim3d_profile(a, b, backend: str = "auto", threads: int | None = None) -> tuple[float, np.ndarray]:
    """(3D SSIM, per-plane means): the SSIM map's mean over the whole cropped map and over each of
    its planes along axis 0 (D - 6 values; plane j is centred on slice j + 3 of the volume)."""
    a, b = checked_volume(a, "training"), checked_volume(b, "generated")
    if a.shape != b.shape:
        raise DeepSSIMError(
            f"3D SSIM needs two volumes of one shape; got {'x'.join(map(str, a.shape))} (training) and "
            f"{'x'.join(map(str, b.shape))} (generated)"
        )
    if backend not in ("auto", "c", "numpy"):
        raise DeepSSIMError(f"unknown 3D SSIM backend {backend!r}; choose auto, c or numpy")
    if backend == "c" and _kernel is None:
        raise DeepSSIMError("the 3D SSIM kernel is not built; use backend='numpy'")
    use_c = _kernel is not None and backend != "numpy"
    count = max(1, threads or _threads()) if use_c else 1
    if count > 1:  # the two volumes' statistics at once: each is one pass over memory
        pool = _pool(count)
        stats_a = pool.submit(_stats, a, use_c, "training")
        mb, sb, _, _ = _stats(b, use_c, "generated")
        ma, sa, lo, hi = stats_a.result()
    else:
        ma, sa, lo, hi = _stats(a, use_c, "training")
        mb, sb, _, _ = _stats(b, use_c, "generated")
    data_range = (hi - lo) / sa
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    depth, height, width = a.shape
    planes = depth - WINDOW + 1
    per_plane_voxels = (height - WINDOW + 1) * (width - WINDOW + 1)
    if use_c:
        sums = np.empty(planes, np.float64)
        count = max(1, min(count, planes // 4 or 1))
        bounds = np.linspace(0, planes, count + 1).astype(int)

        def run(d0: int, d1: int) -> int:
            return _kernel.planes(a, b, sums, depth, height, width, d0, d1, ma, 1 / sa, mb, 1 / sb, c1, c2)

        if count == 1:
            codes = [run(0, planes)]
        else:  # this thread takes the first share
            rest = [_pool(count).submit(run, d0, d1) for d0, d1 in zip(bounds[1:-1], bounds[2:], strict=True)]
            codes = [run(bounds[0], bounds[1])] + [job.result() for job in rest]
        if any(codes):
            raise MemoryError("3D SSIM kernel: out of memory")
        profile = sums / per_plane_voxels
    else:
        profile = _ssim_map((a - ma) / sa, (b - mb) / sb, c1, c2).mean(axis=(1, 2))
    return float(profile.mean()), profile


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = Lock()


def _pool(count: int) -> ThreadPoolExecutor:
    """A lasting pool of count - 1 workers (the calling thread is the count-th): starting threads
    for every pair costs more than a small volume's SSIM."""
    with _pools_lock:
        if count not in _pools:
            _pools[count] = ThreadPoolExecutor(count - 1, thread_name_prefix="deepssim-ssim3d")
        return _pools[count]


def _threads() -> int:
    import torch

    return max(1, torch.get_num_threads())


def checked_volume(volume, role: str) -> np.ndarray:
    """``volume`` as a contiguous float64 3D array of at least 7x7x7, or a DeepSSIMError naming ``role``."""
    volume = np.ascontiguousarray(volume, dtype=np.float64)
    if volume.ndim != 3:
        raise DeepSSIMError(f"3D SSIM takes 3D volumes; the {role} one has shape {volume.shape}")
    if min(volume.shape) < WINDOW:
        raise DeepSSIMError(
            f"the {role} volume is {'x'.join(map(str, volume.shape))}; 3D SSIM needs at least 7x7x7"
        )
    return volume


def _stats(volume: np.ndarray, use_c: bool, role: str) -> tuple[float, float, float, float]:
    if use_c:
        mean, std, lo, hi = _kernel.stats(volume, volume.size)
    else:
        mean, std, lo, hi = volume.mean(), volume.std(), volume.min(), volume.max()
    if not np.isfinite(std):
        raise DeepSSIMError(f"the {role} volume contains NaN or Inf values")
    if not std > 0:
        raise DeepSSIMError(
            f"the {role} volume is constant: it has no standard deviation and cannot be z-scored"
        )
    return float(mean), float(std), float(lo), float(hi)


def _box_mean(volume: np.ndarray) -> np.ndarray:
    """Mean over every 7x7x7 window inside the volume: (D, H, W) -> (D-6, H-6, W-6)."""
    out = volume
    for axis in range(3):
        total = np.cumsum(out, axis=axis)
        shape = list(total.shape)
        shape[axis] = 1
        total = np.concatenate([np.zeros(shape), total], axis=axis)
        n = total.shape[axis]
        out = np.take(total, range(WINDOW, n), axis=axis) - np.take(total, range(0, n - WINDOW), axis=axis)
    return out / VOXELS


def _ssim_map(za: np.ndarray, zb: np.ndarray, c1: float, c2: float) -> np.ndarray:
    mu_a, mu_b = _box_mean(za), _box_mean(zb)
    var_a = COV_NORM * (_box_mean(za * za) - mu_a * mu_a)
    var_b = COV_NORM * (_box_mean(zb * zb) - mu_b * mu_b)
    cov = COV_NORM * (_box_mean(za * zb) - mu_a * mu_b)
    return (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))


def ssim3d_map(a, b) -> np.ndarray:
    """The cropped 3D SSIM map (D-6, H-6, W-6) of a (train, generated) pair (NumPy; for evidence)."""
    a, b = checked_volume(a, "training"), checked_volume(b, "generated")
    ma, sa, lo, hi = _stats(a, False, "training")
    mb, sb, _, _ = _stats(b, False, "generated")
    data_range = (hi - lo) / sa
    return _ssim_map((a - ma) / sa, (b - mb) / sb, (K1 * data_range) ** 2, (K2 * data_range) ** 2)


__all__ = ["ssim3d", "ssim3d_map", "ssim3d_profile"]
