"""The embedding networks, by name: the paper's ConvNeXt-Base, the authors' ConvNeXt-Tiny GeM
variant, and ``deepssim_fast``, our small CNN for CPUs.

Every network maps a batch of z-scored images (B, C, H, W), C = ``input_channels`` (3 for the
ImageNet backbones, which receive the gray image repeated), of any H x W, to (B, 256)
un-normalised embeddings. Layer groups (``layer_groups``) list parameter groups from the
input to the output, for layer-wise learning-rate decay.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from deepssim.errors import DeepSSIMError
from deepssim.registry import Registry

EMBEDDING_DIM = 256

# The architecture registry: name -> network class (built with no arguments). A new architecture is
# one nn.Module subclass with @ARCHITECTURES.register("name") (it needs ``input_channels``).
ARCHITECTURES: Registry[type[nn.Module]] = Registry("architecture")


class GeM(nn.Module):
    """Generalised-mean pooling over H x W (Radenovic et al.), fixed p."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = p
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


@ARCHITECTURES.register("convnext_base")
class ConvNeXtBaseEmbedder(nn.Module):
    """The paper's v1 model: ConvNeXt-Base features, average pool, BN-MLP head to 256-d."""

    input_channels = 3

    def __init__(self):
        super().__init__()
        from torchvision.models import convnext_base

        self.features = convnext_base(weights=None).features
        self.head = nn.Sequential(
            nn.BatchNorm1d(1024),
            nn.Linear(1024, 512),
            nn.GELU(),
            nn.Dropout(0.33),
            nn.Linear(512, EMBEDDING_DIM),
        )
        _freeze(self.features[:2])  # stem and first stage, as in the paper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(-2, -1)))

    def layer_groups(self) -> list[list[nn.Parameter]]:
        return [list(block.parameters()) for block in self.features] + [list(self.head.parameters())]

    def load_imagenet(self, state: dict) -> None:
        _load_features(self.features, state)


@ARCHITECTURES.register("convnext_tiny_gem")
class ConvNeXtTinyGeMEmbedder(nn.Module):
    """The authors' later variant: ConvNeXt-Tiny, GeM (p=3) on each of the four stages."""

    input_channels = 3
    stage_ends = (1, 3, 5, 7)  # indices in torchvision's `features` after which a stage ends

    def __init__(self):
        super().__init__()
        from torchvision.models import convnext_tiny

        self.features = convnext_tiny(weights=None).features
        self.pool = GeM(3.0)
        self.head = nn.Sequential(
            nn.LayerNorm(96 + 192 + 384 + 768),
            nn.Linear(96 + 192 + 384 + 768, 848),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(848, EMBEDDING_DIM),
        )
        _freeze(self.features[:2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = []
        for index, block in enumerate(self.features):
            x = block(x)
            if index in self.stage_ends:
                pooled.append(self.pool(x))
        return self.head(torch.cat(pooled, dim=1))

    def layer_groups(self) -> list[list[nn.Parameter]]:
        return [list(block.parameters()) for block in self.features] + [list(self.head.parameters())]

    def load_imagenet(self, state: dict) -> None:
        _load_features(self.features, state)


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(x + self.bn2(self.conv2(y)), inplace=True)


def _down(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


@ARCHITECTURES.register("deepssim_fast")
class FastEmbedder(nn.Module):
    """``deepssim_fast``: a small residual CNN for CPUs, one gray input channel.

    A stride-2 stem and four stages (each a stride-2 convolution and one residual block) at
    1/4 ... 1/32 of the input size; GeM pooling of every stage, concatenated, as in the authors'
    later variant, so both fine texture and coarse layout reach the embedding.
    Subclasses change the capacity (``widths``) or add a coarse spatial grid (``grid``).
    """

    input_channels = 1
    stem_width = 24
    widths = (32, 64, 128, 256)
    grid = 0  # > 0: also average-pool the last stage to grid x grid cells (coarse layout)

    def __init__(self):
        super().__init__()
        self.grid = type(self).grid  # an instance attribute, so TorchScript export sees it
        self.stem = _down(1, self.stem_width)
        stages = []
        previous = self.stem_width
        for width in self.widths:
            stages.append(nn.Sequential(_down(previous, width), _ResidualBlock(width)))
            previous = width
        self.stages = nn.ModuleList(stages)
        self.pool = GeM(3.0)
        features = sum(self.widths) + self.widths[-1] * self.grid**2
        self.head = nn.Sequential(
            nn.LayerNorm(features),
            nn.Linear(features, 512),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(512, EMBEDDING_DIM),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        pooled = []
        for stage in self.stages:
            x = stage(x)
            pooled.append(self.pool(x))
        if self.grid:
            pooled.append(F.adaptive_avg_pool2d(x, self.grid).flatten(1))
        return self.head(torch.cat(pooled, dim=1))

    def layer_groups(self) -> list[list[nn.Parameter]]:
        return (
            [list(self.stem.parameters())]
            + [list(stage.parameters()) for stage in self.stages]
            + [list(self.head.parameters())]
        )


@ARCHITECTURES.register("deepssim_wide")
class WideFastEmbedder(FastEmbedder):
    """``deepssim_wide``: ``deepssim_fast`` at 1.5x the channels (about 2.2x the compute)."""

    stem_width = 32
    widths = (48, 96, 192, 384)


@ARCHITECTURES.register("deepssim_spatial")
class SpatialFastEmbedder(FastEmbedder):
    """``deepssim_spatial``: ``deepssim_fast`` plus the last stage averaged on a 2 x 2 grid, so
    the embedding keeps where structures are, not only which textures occur."""

    grid = 2


# torchvision's ImageNet checkpoints of the backbones, as torch.hub caches them.
IMAGENET_FILES = {
    "convnext_base": "convnext_base-6075fbad.pth",
    "convnext_tiny_gem": "convnext_tiny-983f1562.pth",
}


def build_network(architecture: str) -> nn.Module:
    return ARCHITECTURES[architecture]()


def imagenet_weights_path(architecture: str, weights_file: str | Path | None = None) -> Path:
    """Where the ImageNet weights of ``architecture`` are: a given file or torch.hub's cache.

    Nothing is downloaded; a missing file is an error that says how to get it.
    """
    if architecture not in IMAGENET_FILES:
        raise DeepSSIMError(f"{architecture} has no ImageNet weights; train it from scratch")
    if weights_file is not None:
        path = Path(weights_file)
    else:
        path = Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILES[architecture]
    if not path.is_file():
        url = f"https://download.pytorch.org/models/{IMAGENET_FILES[architecture]}"
        raise DeepSSIMError(
            f"ImageNet weights for {architecture} not found at {path}; on a machine with internet "
            f"download {url} and copy it there (or pass its path with --pretrained-file)"
        )
    return path


def load_imagenet_weights(network: nn.Module, architecture: str, weights_file=None) -> Path:
    """Load torchvision's ImageNet weights into the backbone (tensors only, no unpickling)."""
    path = imagenet_weights_path(architecture, weights_file)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means the file is not usable
        raise DeepSSIMError(f"{path}: not a readable PyTorch weights file ({error})") from None
    network.load_imagenet(state)
    return path


def _load_features(features: nn.Module, state: dict) -> None:
    prefix = "features."
    wanted = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        features.load_state_dict(wanted, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise DeepSSIMError(f"the ImageNet weights do not fit this backbone: {first}") from None


def _freeze(module: nn.Module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(False)
