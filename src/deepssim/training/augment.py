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

Besides the named sets, any "+"-joined list of *families* is a set of its own (the augmentation
study turns them on and off one at a time): ``flip`` (p 0.5 per axis), ``rotate`` (+-0.1745 rad,
p 0.8), ``translate`` (+-4 px, p 0.8), ``scale`` (0.9-1.05, p 0.5), ``elastic`` (a smooth
displacement of up to 2 px, p 0.5), ``gamma`` (0.5-1.5, p 0.5), ``blur`` (sigma 0.25-1, p 0.5),
``noise`` (Gaussian, sd 0.03 of the range, p 0.5), ``bias`` (as in ``v2``, p 0.5) and ``frame``
(a thin bright border frame, the artefact some generators paint around their samples, p 0.3).

Geometric and intensity transforms come from kornia and work on [0, 1] images, so each batch
is min-max scaled per image first (background at 0, which is also the padding value), and
z-scored per image at the end. Every parameter is drawn per image from the generator state;
``augment_batch`` seeds it, so the same seed gives the same views.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from deepssim.extras import require
from deepssim.io.normalise import unit_range, zscore_batch
from deepssim.registry import Registry

BIAS_FIELD_DEGREE = 3

# The augmentation-set registry: name -> function(kornia.augmentation, height, width) returning the
# list of kornia steps. A new set is one function with @AUGMENTATION_SETS.register("name").
AUGMENTATION_SETS: Registry = Registry("augmentation set")
# The family registry, same signature: one kind of transform each, joined with "+" into a set.
AUGMENTATION_FAMILIES: Registry = Registry("augmentation family")
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


@AUGMENTATION_FAMILIES.register("flip")
def _flip(K, height: int, width: int) -> list:
    return [K.RandomVerticalFlip(p=0.5), K.RandomHorizontalFlip(p=0.5)]


@AUGMENTATION_FAMILIES.register("rotate")
def _rotate(K, height: int, width: int) -> list:
    return [K.RandomAffine(_degrees(0.1745), p=0.8)]


@AUGMENTATION_FAMILIES.register("translate")
def _translate(K, height: int, width: int) -> list:
    return [K.RandomAffine(0.0, translate=(4 / width, 4 / height), p=0.8)]


@AUGMENTATION_FAMILIES.register("scale")
def _scale(K, height: int, width: int) -> list:
    return [K.RandomAffine(0.0, scale=(0.9, 1.05), p=0.5)]


@AUGMENTATION_FAMILIES.register("elastic")
def _elastic(K, height: int, width: int) -> list:
    return [RandomSmoothDisplacement(max_pixels=2.0, p=0.5)]


@AUGMENTATION_FAMILIES.register("gamma")
def _gamma(K, height: int, width: int) -> list:
    return [K.RandomGamma(gamma=(0.5, 1.5), p=0.5)]


@AUGMENTATION_FAMILIES.register("blur")
def _blur(K, height: int, width: int) -> list:
    return [K.RandomGaussianBlur(kernel_size=5, sigma=(0.25, 1.0), p=0.5)]


@AUGMENTATION_FAMILIES.register("noise")
def _noise(K, height: int, width: int) -> list:
    return [K.RandomGaussianNoise(std=0.03, p=0.5)]


@AUGMENTATION_FAMILIES.register("bias")
def _bias(K, height: int, width: int) -> list:
    return [RandomBiasField(BIAS_FIELD_DEGREE, 0.1, p=0.5)]


@AUGMENTATION_FAMILIES.register("frame")
def _frame(K, height: int, width: int) -> list:
    return [RandomBorderFrame(p=0.3)]


def check_augmentation(spec: str) -> list:
    """The step makers of a named set, or of a "+"-joined list of families (in that order); an
    unknown name raises the registry's error, which lists the choices."""
    if spec in AUGMENTATION_SETS:
        return [AUGMENTATION_SETS[spec]]
    return [AUGMENTATION_FAMILIES[family] for family in spec.split("+")]


def augmentation_steps(spec: str, K, height: int, width: int) -> list:
    """The kornia steps of ``spec`` (see :func:`check_augmentation`)."""
    return [step for make in check_augmentation(spec) for step in make(K, height, width)]


class RandomSmoothDisplacement(torch.nn.Module):
    """Warp each image by a smooth random displacement field of up to ``max_pixels`` (bicubic
    upsampling of a 6x6 grid of normal draws), drawn per image: an elastic deformation."""

    def __init__(self, max_pixels: float, p: float, grid: int = 6):
        super().__init__()
        self.max_pixels, self.p, self.grid = max_pixels, p, grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        coarse = torch.randn(batch, 2, self.grid, self.grid, device=images.device)
        field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
        peak = field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
        size = torch.rand(batch, 1, 1, 1, device=images.device) * self.max_pixels
        apply = (torch.rand(batch, 1, 1, 1, device=images.device) < self.p).to(images.dtype)
        pixels = field / peak * size * apply  # (B, 2, H, W): row and column displacement in pixels
        rows = torch.linspace(-1, 1, height, device=images.device).view(1, height, 1)
        columns = torch.linspace(-1, 1, width, device=images.device).view(1, 1, width)
        grid = torch.stack(
            [
                columns + pixels[:, 1] * 2 / max(width - 1, 1),
                rows + pixels[:, 0] * 2 / max(height - 1, 1),
            ],
            dim=-1,
        )
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


class RandomBorderFrame(torch.nn.Module):
    """Paint a thin bright rectangle (1-2 px wide, 0-4 px from the edge, 50-100% of the image's
    maximum) on each image with probability ``p``: the frame some generators add to samples."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        device = images.device
        inset = torch.randint(0, 5, (batch, 1, 1), device=device)
        thickness = torch.randint(1, 3, (batch, 1, 1), device=device)
        level = torch.rand(batch, 1, 1, device=device) * 0.5 + 0.5
        apply = torch.rand(batch, 1, 1, device=device) < self.p
        rows = torch.arange(height, device=device).view(1, height, 1)
        columns = torch.arange(width, device=device).view(1, 1, width)
        distance = torch.minimum(
            torch.minimum(rows, height - 1 - rows), torch.minimum(columns, width - 1 - columns)
        )  # (1, H, W): pixels to the nearest edge
        on_frame = (distance >= inset) & (distance < inset + thickness) & apply
        peak = images.amax(dim=(1, 2, 3)).view(batch, 1, 1)
        painted = torch.where(on_frame, level * peak, images[:, 0])
        return painted.unsqueeze(1)


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

    name: a set name or a "+"-joined list of families (see the module docstring).
    ``seed`` fixes every random draw (kornia samples from torch's global generator, so the
    global state is seeded here and restored afterwards); None uses the current state.
    """
    if name == "none":  # no kornia needed
        return zscore_batch(images)
    steps = augmentation_steps(name, require("kornia.augmentation"), images.shape[-2], images.shape[-1])
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        out = unit_range(images)
        for step in steps:
            out = step(out).clamp(min=0)
    return zscore_batch(out)
