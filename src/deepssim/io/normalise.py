"""Per-image normalisation: grayscale conversion, z-scoring and fitting to a common size."""

from __future__ import annotations

import numpy as np
import torch

from deepssim.errors import DeepSSIMError

# ITU-R BT.601 luma weights, the same as PIL's "L" conversion.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])

FIT_MODES = ("pad", "resize")


def to_gray(image: np.ndarray) -> np.ndarray:
    """Return a 2D float64 image; RGB(A) is reduced to luma and alpha is dropped."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        image = image[..., :3].astype(np.float64) @ LUMA_WEIGHTS
    if image.ndim != 2:
        raise DeepSSIMError(f"expected a 2D image, got an array of shape {image.shape}")
    return image.astype(np.float64, copy=False)


def check_finite_and_varying(image: np.ndarray, name: str) -> None:
    """Raise a clear error for NaN/Inf values or a constant image (no z-score exists)."""
    if not np.all(np.isfinite(image)):
        raise DeepSSIMError(f"{name}: image contains NaN or Inf values; fix or remove the file")
    if image.size == 0 or image.max() == image.min():
        raise DeepSSIMError(
            f"{name}: image is constant (no standard deviation), so it cannot be z-scored; "
            "remove it or use --skip-bad"
        )


def zscore(images: np.ndarray) -> np.ndarray:
    """Z-score each image of an (N, H, W) or (H, W) array on its own, in float64.

    Uses the population standard deviation (ddof=0); SSIM under the paper's rule does not
    depend on this choice because both images of a pair are scaled alike.
    """
    images = np.asarray(images, dtype=np.float64)
    axes = (-2, -1)
    mean = images.mean(axis=axes, keepdims=True)
    std = images.std(axis=axes, keepdims=True)
    if np.any(std == 0):
        raise DeepSSIMError("a constant image has no standard deviation and cannot be z-scored")
    return (images - mean) / std


def fit_to_size(image: np.ndarray, size: tuple[int, int], mode: str = "pad") -> np.ndarray:
    """Bring a 2D image to ``size`` = (H, W).

    ``pad``: centre-crop any dimension that is too large and centre-pad any that is too small
    with the image's minimum (the background of a scan), so no pixel is interpolated.
    ``resize``: bilinear resize with anti-aliasing to exactly (H, W); the aspect ratio changes
    if the shapes differ in proportion.
    """
    height, width = size
    if image.shape == (height, width):
        return image
    if mode == "resize":
        from skimage.transform import resize

        return resize(image, (height, width), order=1, anti_aliasing=True, preserve_range=True)
    if mode != "pad":
        raise DeepSSIMError(f"unknown fit mode {mode!r}; choose one of {', '.join(FIT_MODES)}")
    out = np.full((height, width), image.min(), dtype=np.float64)
    src_rows, dst_rows = _centre_spans(image.shape[0], height)
    src_cols, dst_cols = _centre_spans(image.shape[1], width)
    out[dst_rows, dst_cols] = image[src_rows, src_cols]
    return out


def _centre_spans(have: int, want: int) -> tuple[slice, slice]:
    """Source and destination slices that centre ``have`` pixels in ``want`` pixels."""
    if have >= want:
        start = (have - want) // 2
        return slice(start, start + want), slice(0, want)
    start = (want - have) // 2
    return slice(0, have), slice(start, start + have)


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``HxW`` (e.g. ``136x112``) into (H, W)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise DeepSSIMError(f"--size must look like HxW, e.g. 136x112; got {text!r}") from None
    if height < 7 or width < 7:
        raise DeepSSIMError(f"--size {text}: SSIM needs images of at least 7x7 pixels")
    return height, width


def zscore_batch(images: torch.Tensor) -> torch.Tensor:
    """Z-score (torch) every image of a (B, C, H, W) batch on its own (population std)."""
    mean = images.mean(dim=(-2, -1), keepdim=True)
    std = images.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (images - mean) / std.clamp(min=1e-12)


def unit_range(images) -> torch.Tensor:
    """Min-max scale each image of a (B, [C,] H, W) batch to [0, 1]; adds the channel axis.
    Kornia's augmentations and the baselines' preprocessing work on [0, 1] images."""
    batch = torch.as_tensor(images, dtype=torch.float32)
    if batch.ndim == 3:
        batch = batch.unsqueeze(1)
    low = batch.amin(dim=(-2, -1), keepdim=True)
    high = batch.amax(dim=(-2, -1), keepdim=True)
    return (batch - low) / (high - low).clamp(min=1e-12)
