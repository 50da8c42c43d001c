"""Where a DeepSSIM score comes from: per-pixel attribution of the similarity a pair loses, and
the local SSIM map of the same pair.

Attribution: integrated gradients (Sundararajan et al. 2017) of the cosine with respect to the
second image, along the straight path from the first image (the baseline) to the second. By
completeness the map sums to cos(a, b) - cos(a, a) = cos(a, b) - 1, the similarity the pair
loses, and a pixel where the two images agree gets exactly zero. So the map answers "which
regions make these two images less alike", which is what a reviewer of a flagged pair asks;
Grad-CAM-style maps instead show where the network looks, which is much the same anatomy for
every brain, and need a choice of layer. The pair should be registered first (the report uses
the aligned generated image), since a rigid misalignment spreads the differences everywhere.

The path runs in the first image's intensity space: the second image is first brought to it by
matching medians and interquartile ranges (robust to a local change, unlike the mean and standard
deviation), and each point of the path is z-scored inside the graph, as the network's input is.
A bright lesion therefore stays a local difference instead of shifting every z-scored pixel.

The local SSIM map is scikit-image's ``structural_similarity(..., full=True)`` map under the
project's SSIM definition (z-scored images, data range of the first): its mean over the image
without a 3-pixel border is the SSIM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from deepssim.errors import DeepSSIMError
from deepssim.io.normalise import zscore

DEFAULT_STEPS = 32
SMOOTHING_PX = 2.0


@dataclass
class Explanation:
    """Maps of one (training, generated) pair, each (H, W).

    lost_similarity: integrated-gradients attribution of the cosine lost (>= 0 where a region
    makes the pair less alike); sums to ``cosine - 1``, negated. ssim_map: local SSIM.
    """

    cosine: float
    lost_similarity: np.ndarray
    ssim_map: np.ndarray
    ssim: float


def explain_pair(
    model, train_image, generated_image, steps: int = DEFAULT_STEPS, precision: str = "float32"
) -> Explanation:
    """The attribution and local SSIM maps of one pair of same-sized 2D images (see the module).
    precision: "bfloat16" runs the network under autocast (where the hardware computes it natively
    it is about twice as fast; the map changes by a few percent of its scale)."""
    a, b = np.asarray(train_image, dtype=np.float64), np.asarray(generated_image, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise DeepSSIMError(f"explain needs two 2D images of one size; got {a.shape} and {b.shape}")
    if steps < 1:
        raise DeepSSIMError("steps must be at least 1")
    network = model.network.eval()
    channels = model.input_channels
    device = model.device
    bfloat16 = precision == "bfloat16"
    start = torch.from_numpy(a).float().to(device)
    end = torch.from_numpy(_robust_match(b, a)).float().to(device)
    # the midpoint rule over the path start -> end; the path, its two ends and all steps in one batch
    alphas = (torch.arange(steps, dtype=torch.float32, device=device) + 0.5) / steps
    path = (start + alphas.view(-1, 1, 1) * (end - start)).requires_grad_(True)
    embeddings = _embedding(network, torch.cat([start[None], end[None], path]), channels, bfloat16)
    anchor = embeddings[0].detach()  # the baseline's embedding: a constant of the attribution
    cosine = (embeddings[2:] * anchor).sum(dim=1)
    (gradients,) = torch.autograd.grad(cosine.sum(), path)
    attribution = ((end - start) * gradients.mean(dim=0)).detach().cpu().numpy().astype(np.float64)
    final = float((embeddings[1].detach() * anchor).sum())
    ssim_map, ssim = _ssim_map(zscore(a[None])[0], zscore(b[None])[0])
    # pixel-level gradients are noisy: smoothing (mass-preserving) keeps coherent regions and lets
    # the random-sign attributions of noise cancel
    lost = gaussian_filter(-attribution, SMOOTHING_PX, mode="reflect")
    return Explanation(cosine=final, lost_similarity=lost, ssim_map=ssim_map, ssim=ssim)


def _robust_match(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``image`` with the median and interquartile range of ``reference``."""

    def centre_and_spread(x: np.ndarray) -> tuple[float, float]:
        q1, median, q3 = np.percentile(x, [25, 50, 75])
        return median, max(q3 - q1 if q3 > q1 else x.std(), 1e-12)

    (centre, spread), (target_centre, target_spread) = centre_and_spread(image), centre_and_spread(reference)
    return (image - centre) / spread * target_spread + target_centre


def _embedding(network, images: torch.Tensor, channels: int, bfloat16: bool = False) -> torch.Tensor:
    """L2-normalised embeddings of (B, H, W) raw images, z-scored inside the graph."""
    mean = images.mean(dim=(1, 2), keepdim=True)
    std = images.std(dim=(1, 2), keepdim=True, unbiased=False)
    batch = ((images - mean) / std).unsqueeze(1).expand(-1, channels, -1, -1)
    batch = batch.contiguous(memory_format=torch.channels_last)  # the network's layout: faster convolutions
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bfloat16):
        return torch.nn.functional.normalize(network(batch).float(), dim=1)


def _ssim_map(za: np.ndarray, zb: np.ndarray) -> tuple[np.ndarray, float]:
    from skimage.metrics import structural_similarity

    score, full = structural_similarity(za, zb, data_range=za.max() - za.min(), full=True)
    return full, float(score)
