"""Structure-preserving augmentations (the paper's, the authors' later set and ours), on whole batches.

Each set is a function of a batch of z-scored images (B, 1, H, W) that returns the
augmented batch z-scored again:

- ``v1``: the paper's training set: flips (p 0.33 each), rotation +-0.17 rad (p 0.33),
  gamma 0.5-1.5 (p 0.33).
- ``v2``: the authors' later set: flips (p 0.25 each), affine with
  rotation +-0.09 rad and translation +-4 px (p 0.75), zoom 0.9-1.05 (p 0.75), smooth bias
  field (degree 3, coefficients up to 0.1, p 0.5), gamma 0.5-1.5 (p 0.25), Gaussian smoothing
  sigma 0.25-0.5 (p 0.25).
- ``robust`` (ours; the bundled default model is trained with it): the later set widened to
  the evaluation protocol's misalignment: flips (p 0.5 each), rotation +-0.1745 rad and
  translation +-4 px (p 0.8), zoom 0.9-1.05 (p 0.5), bias field (p 0.5), gamma 0.5-1.5
  (p 0.5), Gaussian smoothing sigma 0.25-0.5 (p 0.25).
- ``rigid`` (ours; the training default and the bundled model's): only what the score must
  ignore: flips (p 0.5 each), rotation +-0.1745 rad and translation +-4 px (p 0.8), gamma
  0.5-1.5 (p 0.5). No blur, bias field or zoom: those change what SSIM measures, and learning
  to ignore them taught the network to call neighbouring slices copies.
- ``misaligned``: the evaluation protocol's views: flip along each axis, rotation uniform in
  +-0.1745 rad and gamma 0.5-1.5, each with probability 0.8.

Geometric and intensity transforms come from kornia and work on [0, 1] images, so each batch
is min-max scaled per image first (background at 0, which is also the padding value), and
z-scored per image at the end. Every parameter is drawn per image from the generator state;
``augment_batch`` seeds it, so the same seed gives the same views.
"""

from __future__ import annotations

import math

import torch

from deepssim.extras import require
from deepssim.io.normalise import unit_range, zscore_batch
from deepssim.registry import Registry

BIAS_FIELD_DEGREE = 3

# The augmentation-set registry: name -> function(kornia.augmentation, height, width) returning the
# list of kornia steps. A new set is one function with @AUGMENTATION_SETS.register("name").
AUGMENTATION_SETS: Registry = Registry("augmentation set")
_degrees = math.degrees


@AUGMENTATION_SETS.register("v1")
def _v1(K, height: int, width: int) -> list:
    return [
        K.RandomVerticalFlip(p=0.33),  # flips along axis 0 (rows) ...
        K.RandomHorizontalFlip(p=0.33),  # ... and along axis 1 (columns)
        K.RandomRotation(_degrees(0.17), p=0.33),
        K.RandomGamma(gamma=(0.5, 1.5), p=0.33),
    ]


@AUGMENTATION_SETS.register("v2")
def _v2(K, height: int, width: int) -> list:
    return [
        K.RandomVerticalFlip(p=0.25),
        K.RandomHorizontalFlip(p=0.25),
        K.RandomAffine(_degrees(0.09), translate=(4 / width, 4 / height), p=0.75),
        K.RandomAffine(0.0, scale=(0.9, 1.05), p=0.75),
        RandomBiasField(BIAS_FIELD_DEGREE, 0.1, p=0.5),
        K.RandomGamma(gamma=(0.5, 1.5), p=0.25),
        K.RandomGaussianBlur(kernel_size=3, sigma=(0.25, 0.5), p=0.25),
    ]


@AUGMENTATION_SETS.register("robust")
def _robust(K, height: int, width: int) -> list:
    return [
        K.RandomVerticalFlip(p=0.5),
        K.RandomHorizontalFlip(p=0.5),
        K.RandomAffine(_degrees(0.1745), translate=(4 / width, 4 / height), p=0.8),
        K.RandomAffine(0.0, scale=(0.9, 1.05), p=0.5),
        RandomBiasField(BIAS_FIELD_DEGREE, 0.1, p=0.5),
        K.RandomGamma(gamma=(0.5, 1.5), p=0.5),
        K.RandomGaussianBlur(kernel_size=3, sigma=(0.25, 0.5), p=0.25),
    ]


@AUGMENTATION_SETS.register("rigid")
def _rigid(K, height: int, width: int) -> list:
    return [
        K.RandomVerticalFlip(p=0.5),
        K.RandomHorizontalFlip(p=0.5),
        K.RandomAffine(_degrees(0.1745), translate=(4 / width, 4 / height), p=0.8),
        K.RandomGamma(gamma=(0.5, 1.5), p=0.5),
    ]


@AUGMENTATION_SETS.register("misaligned")
def _misaligned(K, height: int, width: int) -> list:
    return [
        K.RandomVerticalFlip(p=0.8),
        K.RandomHorizontalFlip(p=0.8),
        K.RandomRotation(_degrees(0.1745), p=0.8),
        K.RandomGamma(gamma=(0.5, 1.5), p=0.8),
    ]


@AUGMENTATION_SETS.register("none")
def _none(K, height: int, width: int) -> list:
    return []


class RandomBiasField(torch.nn.Module):
    """Multiply each image by exp(a smooth polynomial field), as MRI bias fields look.

    The field is a polynomial of total degree ``degree`` in x, y in [-1, 1] with coefficients
    uniform in +-``max_coefficient`` (MONAI's RandBiasField convention), drawn per image.
    """

    def __init__(self, degree: int, max_coefficient: float, p: float):
        super().__init__()
        self.powers = [(i, j) for i in range(degree + 1) for j in range(degree + 1 - i)]
        self.max_coefficient = max_coefficient
        self.p = p

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        y = torch.linspace(-1, 1, height, device=images.device).view(height, 1)
        x = torch.linspace(-1, 1, width, device=images.device).view(1, width)
        basis = torch.stack([(x**i) * (y**j) for i, j in self.powers])  # (terms, H, W)
        coefficients = (
            torch.rand(batch, len(self.powers), device=images.device) * 2 - 1
        ) * self.max_coefficient
        field = torch.einsum("bt,thw->bhw", coefficients, basis).exp().unsqueeze(1)
        apply = (torch.rand(batch, 1, 1, 1, device=images.device) < self.p).to(images.dtype)
        return images * (1 + apply * (field - 1))


def augment_batch(images: torch.Tensor, name: str, seed: int | None = None) -> torch.Tensor:
    """Independently augmented, z-scored views of a (B, 1, H, W) batch of images.

    ``seed`` fixes every random draw (kornia samples from torch's global generator, so the
    global state is seeded here and restored afterwards); None uses the current state.
    """
    make_steps = AUGMENTATION_SETS[name]
    if name == "none":  # no kornia needed
        return zscore_batch(images)
    steps = make_steps(require("kornia.augmentation"), images.shape[-2], images.shape[-1])
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        out = unit_range(images)
        for step in steps:
            out = step(out).clamp(min=0)
    return zscore_batch(out)
