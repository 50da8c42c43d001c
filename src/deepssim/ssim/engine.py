"""The SSIM engine: scikit-image's ``structural_similarity`` under the paper's rule, fast.

The label (Scardace et al., arXiv 2509.16582): each image is z-scored on its own; ``data_range`` is
max - min of the z-scored *train* image; then scikit-image's defaults apply: 7x7 uniform
window, sample covariance (N/(N-1) with N = 49), K1 = 0.01, K2 = 0.03, and the mean of the
SSIM map with a 3-pixel border cropped. The cropped map covers exactly the windows that lie
inside the image, so every statistic below is a "valid" 7x7 box mean.

Per pixel of the valid map, with local means mu, variances var (x N/(N-1)) and covariance
cov: SSIM = (2 mu_a mu_b + C1)(2 cov + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2)),
C1 = (0.01 R)^2, C2 = (0.03 R)^2. Everything except cov depends on one image only, so it is
computed once per image; only the box sum of a*b is computed per pair. On the CPU a fused C
kernel does that (``_kernel.c``, which also prepares the images); elsewhere, or without a
compiler, PyTorch does.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from deepssim.errors import DeepSSIMError
from deepssim.io.normalise import zscore
from deepssim.progress import progress_bar

try:
    from deepssim.ssim import _kernel as _ssim_kernel
except ImportError:  # built without a C compiler: the PyTorch backend serves
    _ssim_kernel = None

WINDOW = 7
K1 = 0.01
K2 = 0.03
COV_NORM = WINDOW * WINDOW / (WINDOW * WINDOW - 1)
BACKENDS = ("auto", "c", "torch")
_KERNEL_LANES = 16  # generated images per SIMD vector in the C kernel; thread chunks are multiples of it
# For the PyTorch backend, generated images are prepared this many at a time into one reused
# buffer (~30 MB at 136x112): fresh memory costs a page fault per page on first touch, which on
# some machines took longer than the SSIM itself. The C kernel needs no buffer.
_GENERATED_CHUNK = 128


@dataclass
class PreparedImages:
    """Z-scored images and their per-image SSIM statistics, ready for pairing.

    ``stats`` (n, H-6, W-6, 3) holds, for each valid pixel, the local mean ``mu``, ``mu_sq`` and
    the local variance ``var`` side by side, so the C kernel reads a pixel's three with one
    pointer. For training images ``mu_sq`` is mu^2 + C1 and ``var`` is var + C2 (C1, C2 come
    from the training image's data range); for generated images they are plain mu^2 and var.
    """

    z: np.ndarray
    stats: np.ndarray
    c1: np.ndarray | None = None
    c2: np.ndarray | None = None

    @property
    def mu(self) -> np.ndarray:
        return self.stats[..., 0]

    @property
    def mu_sq(self) -> np.ndarray:
        return self.stats[..., 1]

    @property
    def var(self) -> np.ndarray:
        return self.stats[..., 2]

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, index) -> PreparedImages:
        """The images at ``index`` (a slice or an index array)."""
        return PreparedImages(
            self.z[index],
            self.stats[index],
            None if self.c1 is None else self.c1[index],
            None if self.c2 is None else self.c2[index],
        )


def _as_stack(images) -> np.ndarray:
    """Images as a float64 (N, H, W) stack, checked. The finiteness check is left to the C
    kernel's preparation where it exists (it sums every image anyway, so it costs nothing)."""
    stack = np.asarray(images, dtype=np.float64) if not isinstance(images, np.ndarray) else images
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3:
        raise DeepSSIMError(f"expected 2D images or an (N, H, W) array, got shape {stack.shape}")
    if stack.shape[1] < WINDOW or stack.shape[2] < WINDOW:
        raise DeepSSIMError(f"images are {stack.shape[1]}x{stack.shape[2]}; SSIM needs at least 7x7")
    if _ssim_kernel is None and not np.all(np.isfinite(stack)):
        raise DeepSSIMError("images contain NaN or Inf values")
    return stack.astype(np.float64, copy=False)


def _unpreparable(code: int, role: str, first: int = 0) -> DeepSSIMError:
    """The error for a C kernel's code: 1 + the index of an image it could not prepare (from
    ``first``), negated when the image has NaN or Inf values, positive when it is constant."""
    which = "training" if role == "train" else role
    index = first + abs(code) - 1
    if code < 0:
        return DeepSSIMError(f"{which} image {index} contains NaN or Inf values")
    return DeepSSIMError(
        f"{which} image {index} is constant: a constant image has no standard deviation and "
        "cannot be z-scored"
    )


def _box_mean(stack: np.ndarray) -> np.ndarray:
    """Mean over every 7x7 window lying inside the image: (n, H, W) -> (n, H-6, W-6).

    Differences of cumulative sums, in float64 (exact enough: values are z-scores).
    """
    total = np.zeros((stack.shape[0], stack.shape[1] + 1, stack.shape[2] + 1))
    np.cumsum(stack, axis=1, out=total[:, 1:, 1:])
    np.cumsum(total[:, 1:, 1:], axis=2, out=total[:, 1:, 1:])
    w = WINDOW
    return (total[:, w:, w:] - total[:, :-w, w:] - total[:, w:, :-w] + total[:, :-w, :-w]) / (w * w)


def prepare(images, role: str, dtype=np.float32, chunk: int = 32) -> PreparedImages:
    """Z-score images and compute their local statistics (in float64, stored as ``dtype``).

    role: "train" (the side whose data range sets C1 and C2) or "generated". The C kernel does
    it in one pass per image; without it, NumPy works through ``chunk`` images at a time so the
    float64 temporaries stay in cache.
    """
    if role not in ("train", "generated"):
        raise ValueError(f"role must be 'train' or 'generated', not {role!r}")
    return _prepare_checked(_as_stack(images), role, dtype, chunk)


def _empty_prepared(n: int, height: int, width: int, dtype, role: str) -> PreparedImages:
    return PreparedImages(
        z=np.empty((n, height, width), dtype),
        stats=np.empty((n, height - WINDOW + 1, width - WINDOW + 1, 3), dtype),
        c1=np.empty(n, dtype) if role == "train" else None,
        c2=np.empty(n, dtype) if role == "train" else None,
    )


def _prepare_checked(
    stack: np.ndarray,
    role: str,
    dtype,
    chunk: int = 32,
    into: PreparedImages | None = None,
    first: int = 0,
) -> PreparedImages:
    """:func:`prepare` on a stack that ``_as_stack`` has already checked; ``into``: generated
    images' arrays of at least ``len(stack)`` images to fill (the first rows) and return;
    ``first``: the index of the stack's first image, for error messages."""
    n, height, width = stack.shape
    prepared = into[:n] if into is not None else _empty_prepared(n, height, width, dtype, role)
    if _ssim_kernel is not None:
        stack = np.ascontiguousarray(stack)
        unused = np.empty(n, dtype)

        def run(start: int, stop: int) -> int:
            code = _ssim_kernel.prepare_images(
                stack[start:stop],
                prepared.z[start:stop],
                prepared.stats[start:stop],
                (prepared.c1 if role == "train" else unused)[start:stop],
                (prepared.c2 if role == "train" else unused)[start:stop],
                stop - start,
                height,
                width,
                role == "train",
                np.dtype(dtype) == np.float64,
            )
            return code if code == 0 else code + (start if code > 0 else -start)

        codes = [code for code in _in_threads(n, run) if code]
        if codes:
            raise _unpreparable(codes[0], role, first)
        return prepared
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        z = zscore(stack[part])
        mu = _box_mean(z)
        var = COV_NORM * (_box_mean(z * z) - mu * mu)
        mu_sq = mu * mu
        if role == "train":
            data_range = z.max(axis=(1, 2)) - z.min(axis=(1, 2))
            c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
            mu_sq += c1[:, None, None]
            var += c2[:, None, None]
            prepared.c1[part], prepared.c2[part] = c1, c2
        prepared.z[part], prepared.mu[part], prepared.mu_sq[part], prepared.var[part] = z, mu, mu_sq, var
    return prepared


def _kernel_arrays(train: PreparedImages, generated: PreparedImages) -> tuple:
    """The C kernels' inputs, in their order: z and statistics of both sides, C1, C2."""
    return (train.z, generated.z, train.stats, generated.stats, train.c1, train.c2)


# The kernels' thread count while torch runs on one thread (kernel_threads); None: torch's count.
_KERNEL_THREADS: int | None = None


@contextlib.contextmanager
def kernel_threads():
    """Within it, the C kernels split their work among as many threads as torch had, and torch
    itself runs on one. Why: after each torch operation its idle OpenMP workers spin-wait for the
    next, on the cores the kernels' threads need; registration interleaves small torch operations
    with kernel calls, and ran 1.65x slower for it on 2 cores (3,530 against 2,146 pairs/s). Not
    for use from several threads at once."""
    global _KERNEL_THREADS
    previous, torch_threads = _KERNEL_THREADS, torch.get_num_threads()
    _KERNEL_THREADS = _thread_count(None)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        _KERNEL_THREADS = previous


def _in_threads(n: int, run, minimum: int = 16) -> list:
    """run(start, stop) over [0, n) split among the kernels' threads (the C kernel releases the GIL):
    the first part in this thread, the others in a pool kept for the process (registration calls
    this thousands of times; starting threads each time cost ~8% of it)."""
    threads = max(1, min(_thread_count(None), n // minimum))
    bounds = np.linspace(0, n, threads + 1).astype(int)
    if threads == 1:
        return [run(0, n)]
    pool = _helpers(threads - 1, os.getpid())  # a forked child gets its own (it has no threads)
    others = [pool.submit(run, a, b) for a, b in zip(bounds[1:-1], bounds[2:], strict=True)]
    return [run(bounds[0], bounds[1]), *(future.result() for future in others)]


@functools.cache
def _helpers(count: int, pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(count, thread_name_prefix="deepssim-kernel")


def ssim_prepared(
    train: PreparedImages,
    generated: PreparedImages,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    threads: int | None = None,
    workspace: np.ndarray | None = None,
) -> np.ndarray:
    """SSIM of every (train, generated) pair of prepared images: an (N, M) array.

    workspace: the C kernel's scratch memory, one row per thread (see :func:`kernel_workspace`),
    for callers that call this many times; made per call otherwise.
    """
    _check_same_shape(train.z.shape[1:], generated.z.shape[1:])
    backend = _choose_backend(backend, device)
    if backend == "c":
        return _ssim_c(train, generated, threads, workspace)
    return _ssim_torch(train, generated, torch.device(device))


def kernel_workspace(height: int, width: int, threads: int | None = None) -> np.ndarray | None:
    """Scratch memory for the C kernel on images of this size, one row per thread (None
    without the kernel). Reusing it across calls avoids touching fresh memory each time."""
    if _ssim_kernel is None:
        return None
    return np.empty((_thread_count(threads), _ssim_kernel.workspace_bytes(height, width)), np.uint8)


def _thread_count(threads: int | None) -> int:
    return threads or _KERNEL_THREADS or torch.get_num_threads() or os.cpu_count() or 1


def _check_same_shape(train_shape, generated_shape) -> None:
    if tuple(train_shape) != tuple(generated_shape):
        raise DeepSSIMError(
            f"training images are {train_shape[0]}x{train_shape[1]} but generated images are "
            f"{generated_shape[0]}x{generated_shape[1]}; bring them to one size (--size HxW)"
        )


def _choose_backend(backend: str, device) -> str:
    if backend not in BACKENDS:
        raise DeepSSIMError(f"unknown SSIM backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    on_cpu = torch.device(device).type == "cpu"
    if backend == "auto":
        return "c" if (_ssim_kernel is not None and on_cpu) else "torch"
    if backend == "c" and (_ssim_kernel is None or not on_cpu):
        raise DeepSSIMError(
            "the C SSIM kernel is not built or the device is not the CPU; use backend='torch'"
        )
    return backend


def _ssim_c(
    train: PreparedImages,
    generated: PreparedImages | np.ndarray,
    threads: int | None,
    workspace: np.ndarray | None,
    first: int = 0,
) -> np.ndarray:
    """Threads take blocks of generated images (each thread interleaves its own blocks once), or
    blocks of training images when there are too few generated images to go round.

    generated: prepared images, or raw float64 images (m, H, W) that the kernel prepares one
    SIMD block at a time straight into its workspace (no prepared copy passes through memory);
    ``first``: the index of their first image, for error messages.
    """
    raw = isinstance(generated, np.ndarray)
    if raw:
        generated = np.ascontiguousarray(generated, dtype=np.float64)
    n, m = len(train), len(generated)
    height, width = train.z.shape[1:]
    dtype = train.z.dtype
    out = np.empty((n, m), dtype=dtype)
    threads = _thread_count(threads)
    if raw:
        args = (train.z, train.stats, train.c1, train.c2, generated, out)
        kernel = _ssim_kernel.ssim_rows_raw
    else:
        args = (*_kernel_arrays(train, generated), out)
        kernel = _ssim_kernel.ssim_rows
    if m >= _KERNEL_LANES * threads:
        step = -(-m // (threads * _KERNEL_LANES)) * _KERNEL_LANES
        blocks = [(0, n, j, min(j + step, m)) for j in range(0, m, step)]
    else:
        step = -(-n // threads)
        blocks = [(i, min(i + step, n), 0, m) for i in range(0, n, step)]
    needed = _ssim_kernel.workspace_bytes(height, width)
    if workspace is None or len(workspace) < len(blocks) or workspace.shape[1] < needed:
        workspace = kernel_workspace(height, width, len(blocks))

    def run(k: int) -> int:
        return kernel(*args, *blocks[k], m, height, width, dtype == np.float64, workspace[k])

    if len(blocks) == 1:
        codes = [run(0)]
    else:
        with ThreadPoolExecutor(len(blocks)) as pool:
            codes = list(pool.map(run, range(len(blocks))))
    codes = [code for code in codes if code]
    if codes:
        raise _unpreparable(codes[0], "generated", first)
    return out


def _ssim_torch(
    train: PreparedImages,
    generated: PreparedImages,
    device: torch.device,
    max_elements: int = 2**26,
) -> np.ndarray:
    """The same formula with tensor ops, in chunks of train rows to bound memory."""

    def tensor(array):
        return torch.from_numpy(array).to(device)

    za, ma, sa, va = map(tensor, (train.z, train.mu, train.mu_sq, train.var))
    zb, mb, sb, vb = map(tensor, (generated.z, generated.mu, generated.mu_sq, generated.var))
    c1 = tensor(train.c1)[:, None, None, None]
    c2 = tensor(train.c2)[:, None, None, None]
    n, height, width = za.shape
    ho, wo = height - WINDOW + 1, width - WINDOW + 1
    rows_per_chunk = max(1, max_elements // (len(zb) * height * width))
    out = torch.empty((n, len(zb)), dtype=za.dtype, device=device)
    for start in range(0, n, rows_per_chunk):
        part = slice(start, start + rows_per_chunk)
        product = za[part, None] * zb[None]
        box = sum(product[..., k : k + ho, :] for k in range(WINDOW))
        box = sum(box[..., k : k + wo] for k in range(WINDOW))
        m = ma[part, None] * mb[None]
        covariance2 = (2 * COV_NORM / 49) * box - (2 * COV_NORM) * m
        numerator = (2 * m + c1[part]) * (covariance2 + c2[part])
        denominator = (sa[part, None] + sb[None]) * (va[part, None] + vb[None])
        out[part] = (numerator / denominator).mean(dim=(-2, -1))
    return out.cpu().numpy()


def ssim(a, b, dtype=np.float64) -> float:
    """SSIM of one (train ``a``, generated ``b``) pair of 2D images (or 3D volumes) of raw intensities.

    Equals ``skimage.metrics.structural_similarity(za, zb, data_range=za.max() - za.min())``
    for the z-scored images ``za``, ``zb``. Not symmetric: the data range comes from ``a``.
    Two 3D volumes get the 3D definition (7x7x7 window; :mod:`deepssim.ssim.volume`).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim == 3 and b.ndim == 3:  # volumes
        from deepssim.ssim.volume import ssim3d

        return ssim3d(a, b)
    if a.ndim != 2 or b.ndim != 2:
        raise DeepSSIMError(f"ssim takes two 2D images; got shapes {a.shape} and {b.shape}")
    return float(ssim_prepared(prepare(a, "train", dtype), prepare(b, "generated", dtype))[0, 0])


def ssim_pairs(train, generated, dtype=np.float64, chunk: int = 256) -> np.ndarray:
    """SSIM of matched pairs: an (N,) array with [i] = ssim(train[i], generated[i]).

    For pair tables (training targets, labelled benchmarks), where the full matrix is waste.
    """
    train, generated = _as_stack(train), _as_stack(generated)
    if len(train) != len(generated):
        raise DeepSSIMError(
            f"ssim_pairs needs as many training as generated images ({len(train)} != {len(generated)})"
        )
    _check_same_shape(train.shape[1:], generated.shape[1:])
    out = np.empty(len(train), dtype=dtype)
    for start in range(0, len(train), chunk):
        part = slice(start, start + chunk)
        a, b = prepare(train[part], "train", np.float64), prepare(generated[part], "generated", np.float64)
        out[part] = ssim_prepared_pairs(a, b)
    return out


def ssim_prepared_pairs(train: PreparedImages, generated: PreparedImages) -> np.ndarray:
    """SSIM of matched prepared pairs (train[i], generated[i]): an (N,) array."""
    _check_same_shape(train.z.shape[1:], generated.z.shape[1:])
    if _ssim_kernel is not None and train.z.dtype == generated.z.dtype:
        height, width = train.z.shape[1:]
        out = np.empty(len(train), dtype=train.z.dtype)
        arrays = [np.ascontiguousarray(a) for a in _kernel_arrays(train, generated)]

        def run(start: int, stop: int) -> None:
            _ssim_kernel.ssim_pairs(
                *(a[start:stop] for a in arrays),
                out[start:stop],
                stop - start,
                height,
                width,
                train.z.dtype == np.float64,
            )

        _in_threads(len(train), run)
        return out.astype(np.float64)
    mu_ab = train.mu * generated.mu
    covariance = COV_NORM * (_box_mean(train.z * generated.z) - mu_ab)
    c1, c2 = train.c1[:, None, None], train.c2[:, None, None]
    ssim_map = (
        (2 * mu_ab + c1)
        * (2 * covariance + c2)
        / ((train.mu_sq + generated.mu_sq) * (train.var + generated.var))
    )
    return ssim_map.mean(axis=(1, 2))


def ssim_prepared_pairs_indexed(
    train: PreparedImages, generated: PreparedImages, train_index, generated_index
) -> np.ndarray:
    """SSIM of the pairs (train[train_index[p]], generated[generated_index[p]]): a (P,) array,
    without gathering copies of the prepared images (each may serve many pairs)."""
    _check_same_shape(train.z.shape[1:], generated.z.shape[1:])
    ia = np.ascontiguousarray(train_index, dtype=np.int64)
    ib = np.ascontiguousarray(generated_index, dtype=np.int64)
    if ia.shape != ib.shape or ia.ndim != 1:
        raise DeepSSIMError("train_index and generated_index must be 1D arrays of one length")
    if len(ia) and (ia.min() < 0 or ia.max() >= len(train) or ib.min() < 0 or ib.max() >= len(generated)):
        raise DeepSSIMError("pair index out of range")
    if _ssim_kernel is None or train.z.dtype != generated.z.dtype:
        return ssim_prepared_pairs(train[ia], generated[ib])
    height, width = train.z.shape[1:]
    out = np.empty(len(ia), dtype=train.z.dtype)
    arrays = [np.ascontiguousarray(a) for a in _kernel_arrays(train, generated)]

    def run(start: int, stop: int) -> None:
        _ssim_kernel.ssim_pairs_indexed(
            *arrays,
            ia[start:stop],
            ib[start:stop],
            out[start:stop],
            stop - start,
            height,
            width,
            train.z.dtype == np.float64,
        )

    _in_threads(len(ia), run)
    return out.astype(np.float64)


@dataclass
class TrainingStatistics:
    """Training images prepared for :func:`ssim_raw_pairs`: z-scores ``z`` (n, H, W), and per valid
    pixel the local mean ``mu`` and the local variance plus C2 ``var`` (n, H-6, W-6), each a plane (a
    pair kernel reads them at unit stride); C1 and C2 per image."""

    z: np.ndarray
    mu: np.ndarray
    var: np.ndarray
    c1: np.ndarray
    c2: np.ndarray

    @classmethod
    def empty(cls, n: int, height: int, width: int) -> TrainingStatistics:
        valid = (n, height - WINDOW + 1, width - WINDOW + 1)
        return cls(np.empty((n, height, width)), np.empty(valid), np.empty(valid), np.empty(n), np.empty(n))

    def put(self, rows, images: np.ndarray) -> None:
        """Prepare the training images ``images`` (raw, float64) into ``rows``."""
        prepared = prepare(images, "train", np.float64)
        self.z[rows], self.mu[rows], self.var[rows] = prepared.z, prepared.mu, prepared.var
        self.c1[rows], self.c2[rows] = prepared.c1, prepared.c2


def ssim_raw_pairs(train: TrainingStatistics, raw, train_index, raw_index, stack_index=None) -> np.ndarray:
    """SSIM of the pairs (train[train_index[p]], raw[raw_index[p]]) in float64: a (P,) array.

    raw: (m, H, W) images not prepared, or a list of such stacks with ``stack_index[p]`` naming pair
    p's (so candidates made apart need not be copied into one). For images that serve about one pair
    each (registration's candidates): the C kernel z-scores each pair's image and slides its 7x7 sums
    down it in cache, so nothing of it is stored; without the kernel they are prepared first. Pairs of
    one training image in a row read its statistics from memory once."""
    stacks = [_as_stack(r) for r in raw] if isinstance(raw, list | tuple) else [_as_stack(raw)]
    for stack in stacks:
        _check_same_shape(train.z.shape[1:], stack.shape[1:])
    ia = np.ascontiguousarray(train_index, dtype=np.int64)
    ib = np.ascontiguousarray(raw_index, dtype=np.int64)
    which = (
        np.zeros(len(ia), np.int64) if stack_index is None else np.ascontiguousarray(stack_index, np.int64)
    )
    if not (ia.shape == ib.shape == which.shape and ia.ndim == 1):
        raise DeepSSIMError("train_index, raw_index and stack_index must be 1D arrays of one length")
    sizes = np.array([len(stack) for stack in stacks])
    if len(ia) and (
        ia.min() < 0
        or ia.max() >= len(train.z)
        or which.min() < 0
        or which.max() >= len(stacks)
        or ib.min() < 0
        or (ib >= sizes[which]).any()
    ):
        raise DeepSSIMError("pair index out of range")
    out = np.empty(len(ia))
    if _ssim_kernel is None:
        for k, stack in enumerate(stacks):
            mine = which == k
            used, rows = np.unique(ia[mine], return_inverse=True)
            mu, c1 = train.mu[used], train.c1[used]
            stats = np.stack([mu, mu * mu + c1[:, None, None], train.var[used]], axis=-1)
            prepared = PreparedImages(train.z[used], stats, c1, train.c2[used])
            out[mine] = ssim_prepared_pairs_indexed(
                prepared, prepare(stack, "generated", np.float64), rows, ib[mine]
            )
        return out
    height, width = stacks[0].shape[1:]
    arrays = [np.ascontiguousarray(a) for a in (train.z, train.mu, train.var, train.c1, train.c2)]
    stacks = tuple(np.ascontiguousarray(stack) for stack in stacks)

    def run(start: int, stop: int) -> int:
        part = slice(start, stop)
        code = _ssim_kernel.ssim_raw_pairs(
            *arrays, stacks, which[part], ia[part], ib[part], out[part], stop - start, height, width
        )
        return 0 if code == 0 else int(np.sign(code) * (ib[start + abs(code) - 1] + 1))

    codes = [code for code in _in_threads(len(ia), run, minimum=4) if code]
    if codes:
        raise _unpreparable(codes[0], "generated")
    return out


def ssim_matrix(
    train,
    generated,
    dtype=np.float32,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    block_size: int = 2048,
    progress: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """SSIM of every pair: an (N, M) array with [i, j] = ssim(train[i], generated[j]).

    train, generated: sequences of 2D arrays, (N, H, W) arrays, or :class:`deepssim.ImageSet`s
    (read lazily). float32 (default) agrees with scikit-image to ~1e-6; float64 to ~1e-12.
    out: an (N, M) array to fill (e.g. a memory-mapped file for matrices larger than RAM).
    """
    train_source, generated_source = _as_source(train), _as_source(generated)
    if out is None:
        out = np.empty((len(train_source), len(generated_source)), dtype=dtype)
    for r0, s0, block in ssim_blocks(
        train_source, generated_source, dtype, backend, device, block_size, progress
    ):
        out[r0 : r0 + block.shape[0], s0 : s0 + block.shape[1]] = block
    return out


def ssim_blocks(
    train,
    generated,
    dtype=np.float32,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    block_size: int = 2048,
    progress: bool = False,
    cache_bytes: int = 2 * 2**30,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (train_start, generated_start, block) so any N x M can be streamed to disk.

    Generated images are read once per block. The C kernel prepares them itself, per training
    block, one SIMD block at a time; the PyTorch backend gets them prepared 128 at a time into
    one reused buffer. Prepared train blocks are kept while they fit in ``cache_bytes`` and
    re-read otherwise.
    """
    train, generated = _as_source(train), _as_source(generated)
    _check_same_shape(train.shape, generated.shape)
    in_kernel = _choose_backend(backend, device) == "c"
    itemsize = np.dtype(dtype).itemsize
    keep_train = 4 * len(train) * train.shape[0] * train.shape[1] * itemsize <= cache_bytes
    train_cache: dict[int, PreparedImages] = {}
    chunk = min(_GENERATED_CHUNK, len(generated))
    height, width = generated.shape
    buffer = None if in_kernel else _empty_prepared(chunk, height, width, dtype, "generated")
    workspace = kernel_workspace(height, width)
    bar = progress_bar(len(train) * len(generated), "SSIM pairs", "pair", progress)
    for s0 in range(0, len(generated), block_size):
        generated_block = generated.read(s0, s0 + block_size)
        for r0 in range(0, len(train), block_size):
            prepared_train = train_cache.get(r0)
            if prepared_train is None:
                prepared_train = _prepare_checked(train.read(r0, r0 + block_size), "train", dtype, first=r0)
                if keep_train:
                    train_cache[r0] = prepared_train
            if in_kernel:
                block = _ssim_c(prepared_train, generated_block, None, workspace, first=s0)
            else:
                block = np.empty((len(prepared_train), len(generated_block)), dtype)
                for g0 in range(0, len(generated_block), chunk):
                    part = _prepare_checked(
                        generated_block[g0 : g0 + chunk], "generated", dtype, into=buffer, first=s0 + g0
                    )
                    block[:, g0 : g0 + chunk] = ssim_prepared(prepared_train, part, backend, device)
            bar.update(block.size)
            yield r0, s0, block
    bar.close()


class _ArraySource:
    """In-memory images with the ``read(start, stop)`` interface of :class:`ImageSet`, checked once."""

    def __init__(self, images):
        if isinstance(images, list | tuple):
            shapes = {np.shape(image) for image in images}
            if len(shapes) != 1:
                raise DeepSSIMError(f"images have different shapes: {sorted(shapes)}")
            images = np.stack([np.asarray(image, dtype=np.float64) for image in images])
        self.images = _as_stack(images)
        self.shape = self.images.shape[1:]

    def __len__(self) -> int:
        return len(self.images)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.images[start:stop]


class _CheckedSource:
    """Another source (an :class:`ImageSet`) whose blocks are checked as they are read."""

    def __init__(self, source):
        self.source, self.shape = source, source.shape

    def __len__(self) -> int:
        return len(self.source)

    def read(self, start: int, stop: int) -> np.ndarray:
        return _as_stack(self.source.read(start, stop))


def _as_source(images):
    """Images as a source whose ``read`` returns checked float64 stacks (checked once)."""
    if isinstance(images, _ArraySource | _CheckedSource):
        return images
    if hasattr(images, "read") and hasattr(images, "shape"):
        return _CheckedSource(images)
    return _ArraySource(images)


__all__ = ["PreparedImages", "prepare", "ssim", "ssim_blocks", "ssim_matrix", "ssim_pairs", "ssim_prepared"]
