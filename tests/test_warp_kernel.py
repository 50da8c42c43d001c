"""The C warp kernel (_warp_kernel.c) computes what torch's grid_sample computes for registration's
warps, and registration's results do not depend on which of the two warps."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from deepssim.io.normalise import zscore
from deepssim.ssim import _alignment
from deepssim.ssim._alignment import _level, _sampling_map, _warp
from deepssim.ssim.registered import register_pairs
from tests.helpers import SOURCES, smooth_image

pytestmark = pytest.mark.skipif(_alignment._warp_kernel is None, reason="the warp kernel is not built")


@pytest.fixture(scope="module")
def slices() -> np.ndarray:
    volume = np.asarray(nib.load(SOURCES / "KmeansTest_T1UCharRaw.nii.gz").dataobj, dtype=np.float64)
    return np.stack([volume[:, 8:120, k] for k in (20, 30, 40)])  # 128 x 112


def _grid_sample_warp(monkeypatch, *args) -> torch.Tensor:
    with monkeypatch.context() as patch:
        patch.setattr(_alignment, "_warp_kernel", None)
        return _warp(*args)


def _maps(rng, n: int, full) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips, rotations up to 15 deg, scales 0.9-1.1 and shifts up to 10% of the frame."""
    shift = rng.uniform(-0.1, 0.1, (n, 2)) * np.asarray(full)
    return _sampling_map(rng.integers(0, 4, n), rng.uniform(-15, 15, n), rng.uniform(0.9, 1.1, n), shift)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize(
    "level, full, k, stride",
    [
        ((24, 20), (128, 112), 6, 1),  # the coarse level: several maps per image
        ((64, 56), (128, 112), 2, 2),  # Gauss-Newton at ~64 px, every other row and column
        ((128, 112), (128, 112), 1, 2),
        ((128, 112), (128, 112), 1, 1),  # the final warp
        ((128, 128), (128, 128), 1, 1),
        ((7, 5), (128, 112), 3, 1),  # most taps outside
    ],
)
def test_kernel_equals_grid_sample(monkeypatch, slices, mode, level, full, k, stride):
    rng = np.random.default_rng(sum(level) + k)
    smooth = np.stack([smooth_image(rng, full) for _ in range(3)])
    frames = slices if full == (128, 112) else np.stack([np.pad(s, ((0, 0), (8, 8))) for s in slices])
    z = torch.from_numpy(zscore(np.concatenate([frames, smooth]))).float()
    images = torch.nn.functional.adaptive_avg_pool2d(z[:, None], level)[:, 0]
    linear, offset = _maps(rng, len(images) * k, full)
    linear, offset = linear.reshape(len(images), k, 2, 2), offset.reshape(len(images), k, 2)
    rows, cols = (x[::stride] for x in _level(level, full, "cpu"))
    args = (images, linear, offset, rows, cols, full, mode)
    kernel, reference = _warp(*args), _grid_sample_warp(monkeypatch, *args)
    assert kernel.shape == reference.shape == (len(images), k, len(rows), len(cols))
    assert (kernel - reference).abs().max() <= 1e-5


def test_other_dtypes_use_grid_sample(monkeypatch):
    images = torch.randn(2, 16, 12, dtype=torch.float64)
    linear, offset = _maps(np.random.default_rng(0), 2, (16, 12))
    args = (images, linear[:, None].double(), offset[:, None].double(), *_level((16, 12), (16, 12), "cpu"))
    out = _warp(*args, (16, 12), "bicubic")
    assert out.dtype == torch.float64
    assert torch.equal(out, _grid_sample_warp(monkeypatch, *args, (16, 12), "bicubic"))


def test_registration_is_unchanged(monkeypatch, slices):
    """register_pairs with the C kernels (warps, Gauss-Newton) and with torch's grid_sample and tensor
    Gauss-Newton: the same scores and flips, transforms within float32 rounding (the C Gauss-Newton
    sums in double, torch in float32)."""
    rng = np.random.default_rng(3)
    train, generated = [], []
    for i, (flip, angle, zoom, shift) in enumerate(
        [("none", 7, 1.0, (3, -5)), ("cols", -12, 1.06, (0, 4)), ("rows", 3, 0.94, (-6, 2))]
        + [("both", 0, 1.0, (2.5, 0)), ("none", -4, 1.03, (1, 1))]
    ):
        image = slices[i % 3]
        noisy = image + rng.normal(0, 5, image.shape)
        noisy = noisy[::-1] if flip in ("rows", "both") else noisy
        noisy = noisy[:, ::-1] if flip in ("cols", "both") else noisy
        moved = ndimage.rotate(noisy, angle, reshape=False, order=3, mode="constant", cval=noisy.min())
        moved = ndimage.affine_transform(moved, np.eye(2) / zoom, order=3, cval=noisy.min())
        train.append(image)
        generated.append(ndimage.shift(moved, shift, order=3, mode="constant", cval=noisy.min()))
    train.append(slices[0])
    generated.append(slices[2])  # another slice
    train, generated = np.stack(train), np.stack(generated)

    kernel = register_pairs(train, generated)
    with monkeypatch.context() as patch:
        patch.setattr(_alignment, "_warp_kernel", None)
        reference = register_pairs(train, generated)
    assert list(kernel.flip) == list(reference.flip)
    for field, tolerance in [
        ("ssim_registered", 1e-6),
        ("ssim_plain", 1e-12),
        ("gamma", 0),
        ("rotation_deg", 1e-4),
        ("scale", 1e-6),
        ("shift_px", 1e-4),
    ]:
        np.testing.assert_allclose(getattr(kernel, field), getattr(reference, field), rtol=0, atol=tolerance)
    assert np.sum(kernel.rotation_deg != 0) >= 3  # interpolated transforms were chosen and compared


def test_gauss_newton_kernel_equals_tensor_gauss_newton(monkeypatch, slices):
    """The C Gauss-Newton and the tensor one (the GPU's) refine the same starts to the same maps."""
    rng = np.random.default_rng(5)
    full = (128, 112)
    z = torch.from_numpy(zscore(slices)).float()
    templates = _alignment._templates(_alignment._pool(z, (64, 56)), full, 2)
    moved = torch.from_numpy(zscore(slices[[1, 2, 0, 1]] + rng.normal(0, 3, (4, *full)))).float()
    images = _alignment._pool(moved - moved.amin(dim=(1, 2), keepdim=True), (64, 56))
    linear, offset = _maps(rng, 8, full)
    linear, offset = linear.reshape(4, 2, 2, 2), offset.reshape(4, 2, 2)
    owner, fill = torch.tensor([1, 2, 0, 0]), moved.amin(dim=(1, 2))
    args = (templates, owner, fill, images, torch.arange(4), linear, offset, full, 3)
    kernel = _alignment._gauss_newton(*args)
    with monkeypatch.context() as patch:
        patch.setattr(_alignment, "_warp_kernel", None)
        reference = _alignment._gauss_newton(*args)
    for a, b in zip(kernel, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.equal(kernel[0], linear)  # the maps moved


@pytest.mark.skipif(_alignment._ssim_kernel is None, reason="the SSIM kernel is not built")
@pytest.mark.parametrize(
    "shape, pr, pc, candidates, flips",
    [((23, 19), 3, 2, 21, 4), ((23, 19), 3, 2, 21, 1), ((17, 30), 2, 6, 9, 4), ((7, 8), 3, 4, 16, 4)],
)
def test_coarse_search_kernel_equals_grouped_convolution(monkeypatch, shape, pr, pc, candidates, flips):
    """The C kernel's coarse correlations (default grid; no flips; wider column shifts with a
    candidate count not a multiple of 8; a tiny image whose shifted frames overlap) pick what the
    torch path's grouped convolution picks, with its scores."""
    generator = torch.Generator().manual_seed(sum(shape) + candidates)
    coarse = torch.randn((12, *shape), generator=generator)
    coarse = coarse - coarse.mean(dim=(1, 2), keepdim=True)
    coarse = coarse / coarse.flatten(1).norm(dim=1)[:, None, None]
    warped = torch.randn((5, candidates, *shape), generator=generator).clamp_min(0)  # (fill 0)
    pt = torch.randint(0, 12, (40,), generator=generator)
    pc_ = torch.randint(0, 5, (40,), generator=generator).sort().values  # neighbours share candidates
    best, index = _alignment._coarse_scores(coarse, pt, warped, pc_, pr, pc, flips)
    with monkeypatch.context() as patch:
        patch.setattr(_alignment, "_ssim_kernel", None)
        reference_best, reference_index = _alignment._coarse_scores(coarse, pt, warped, pc_, pr, pc, flips)
    assert best.shape == (40, flips)
    torch.testing.assert_close(best, reference_best, rtol=0, atol=1e-5)
    assert torch.equal(index, reference_index)


@pytest.mark.parametrize("shape", [(23, 19), (64, 53), (7, 5), (50, 100)])
def test_pooling_kernel_equals_adaptive_avg_pool(shape):
    """Registration's pooling (coarse and middle levels, odd ratios, one level wider than its image)
    is torch's adaptive_avg_pool2d bit for bit, also when the images are split among threads."""
    images = torch.randn((9, 41, 67), generator=torch.Generator().manual_seed(3))
    pooled = _alignment._pool(images, shape)
    assert torch.equal(pooled, torch.nn.functional.adaptive_avg_pool2d(images[:, None], shape)[:, 0])
