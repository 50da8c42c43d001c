"""A trained DeepSSIM embedder: loading, saving, exporting, and the embed / similarity API.

Our checkpoint is two files side by side: ``NAME.safetensors`` (the weights, tensors only) and
``NAME.json`` (the configuration: architecture, embedding size, input normalisation, the
training summary and the default thresholds). A TorchScript file that maps a (B, 3, H, W)
batch of z-scored, channel-repeated images to (B, D) embeddings -- the form in which the
paper's authors publish their model -- loads through the same :meth:`DeepSSIM.load`.
"""

from __future__ import annotations

import hashlib
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.fx.experimental.optimization import fuse

from deepssim.embedding.networks import build_network
from deepssim.errors import DeepSSIMError
from deepssim.hardware import resolve_precision
from deepssim.io.checkpoints import load_checkpoint, save_checkpoint
from deepssim.io.files import atomic_path
from deepssim.io.load import image_batches
from deepssim.labels import PAPER_THRESHOLDS
from deepssim.progress import progress_bar

CHECKPOINT_FORMAT = "deepssim-checkpoint"
FORMAT_VERSION = 1
DEFAULT_THRESHOLDS = dict(zip(("low", "high"), PAPER_THRESHOLDS, strict=True))


def make_config(architecture: str, input_channels: int, embedding_dim: int, training=None) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "embedding_dim": embedding_dim,
        "input": {
            "channels": input_channels,
            "normalisation": "z-score each grayscale image on its own (population std); "
            "repeated to every input channel",
        },
        "similarity": "cosine of L2-normalised embeddings",
        "thresholds": dict(DEFAULT_THRESHOLDS),
        "training": training or {},
    }


class DeepSSIM:
    """An embedding network whose cosine similarity approximates SSIM, robust to misalignment.

    >>> model = DeepSSIM.load("default")
    >>> model.matrix(training_images, generated_images)  # (N, M) scores

    Images are 2D arrays of raw intensities (any size; z-scoring happens inside), an
    (N, H, W) array, a list of 2D arrays, or a :class:`deepssim.ImageSet`.
    """

    def __init__(self, network: torch.nn.Module, config: dict, device: str = "cpu", name: str = ""):
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        if not isinstance(network, torch.jit.ScriptModule):
            self.network = self.network.to(memory_format=torch.channels_last)  # faster convolutions
        self.config = config
        self.name = name or config.get("architecture", "model")
        self._fingerprint: str | None = None
        self._inference: tuple[tuple, torch.nn.Module] | None = None  # (weights' versions, network)

    @property
    def thresholds(self) -> tuple[float, float]:
        thresholds = self.config.get("thresholds", DEFAULT_THRESHOLDS)
        return float(thresholds["low"]), float(thresholds["high"])

    @property
    def fingerprint(self) -> str:
        """A hash of the weights: embeddings cached under it are valid for this model only."""
        if self._fingerprint is None:
            digest = hashlib.sha256(self.config.get("architecture", "").encode())
            if isinstance(self.network, torch.jit.ScriptModule):
                digest.update(Path(self.config["source"]).read_bytes())
            else:
                for key, value in sorted(self.network.state_dict().items()):
                    digest.update(key.encode())
                    digest.update(value.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    @property
    def input_channels(self) -> int:
        return int(self.config["input"]["channels"])

    @classmethod
    def load(cls, source: str | Path = "default", device: str = "cpu") -> DeepSSIM:
        """Load "default" (the model shipped in the package), one of our checkpoints
        (``NAME.safetensors`` with ``NAME.json`` beside it; either path works) or a
        TorchScript embedder file."""
        _check_device(device)
        if str(source) == "default":
            weights = resources.files("deepssim.embedding") / "weights" / "default.safetensors"
            with resources.as_file(weights) as path:
                if not path.is_file():
                    raise DeepSSIMError(
                        "the default model is missing from this installation; reinstall deepssim"
                    )
                return cls._load_checkpoint(path, device, "default")
        path = Path(source)
        if not path.exists():
            raise DeepSSIMError(f"{path}: no such model file")
        if path.suffix in (".safetensors", ".json"):
            return cls._load_checkpoint(path.with_suffix(".safetensors"), device, str(path))
        return cls._load_torchscript(path, device)

    @classmethod
    def _load_checkpoint(cls, weights_path: Path, device: str, name: str) -> DeepSSIM:
        state, config, weights_path = load_checkpoint(
            weights_path, CHECKPOINT_FORMAT, "a DeepSSIM checkpoint (`deepssim train`, `fit`)", FORMAT_VERSION
        )
        network = build_network(config["architecture"])
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            first = str(error).splitlines()[0]
            raise DeepSSIMError(
                f"{weights_path}: weights do not match architecture {config['architecture']}: {first}"
            ) from None
        return cls(network, config, device, name)

    @classmethod
    def _load_torchscript(cls, path: Path, device: str) -> DeepSSIM:
        try:
            network = torch.jit.load(str(path), map_location=device)
        except Exception:  # noqa: BLE001 - anything unreadable is not a model we can use
            raise DeepSSIMError(
                f"{path}: neither a DeepSSIM checkpoint (.safetensors + .json) nor a TorchScript file; "
                "pass a model written by `deepssim train` or `deepssim export`, or the authors' "
                "TorchScript embedder"
            ) from None
        config = make_config("torchscript", 3, 0)
        config["source"] = str(path)
        model = cls(network, config, device, str(path))
        probe = model._forward(np.zeros((1, 32, 32), dtype=np.float32) + np.eye(32, dtype=np.float32))
        if probe.ndim != 2:
            raise DeepSSIMError(
                f"{path}: the TorchScript model returns shape {tuple(probe.shape)}, not (B, D)"
            )
        config["embedding_dim"] = int(probe.shape[1])
        return model

    def save(self, path: str | Path, training: dict | None = None) -> Path:
        """Write ``NAME.safetensors`` and ``NAME.json`` (atomically); returns the weights path."""
        if isinstance(self.network, torch.jit.ScriptModule):
            raise DeepSSIMError("a TorchScript model cannot be saved as a checkpoint; keep the file as it is")
        config = dict(self.config)
        if training is not None:
            config["training"] = training
        return save_checkpoint(self.network.state_dict(), config, path)

    def export_torchscript(self, path: str | Path) -> Path:
        """Write a TorchScript embedder taking (B, 3, H, W) z-scored, channel-repeated images."""
        wrapper = _ThreeChannelInput(self.network, self.input_channels).cpu().eval()
        with warnings.catch_warnings():  # TorchScript is deprecated upstream but is the authors' format
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.script(wrapper)
        path = Path(path)
        with atomic_path(path, suffix=".pt") as temporary:
            scripted.save(str(temporary))
        return path

    def embed(
        self,
        images,
        batch_size: int = 64,
        precision: str = "float32",
        progress: bool = False,
    ) -> np.ndarray:
        """L2-normalised embeddings, (N, D) float32, in the order of ``images``.

        precision: float32, bfloat16, or auto (bfloat16 where the hardware computes it natively).
        """
        precision = resolve_precision(precision, str(self.device))
        outputs = []
        bar = progress_bar(_count(images), "embedding", "img", progress)
        for batch in image_batches(images, batch_size):
            outputs.append(self._forward(batch, precision))
            bar.update(len(batch))
        bar.close()
        if not outputs:
            return np.zeros((0, int(self.config.get("embedding_dim", 0))), dtype=np.float32)
        embeddings = np.concatenate(outputs)
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        return embeddings / np.maximum(norms, 1e-12)

    def similarity(self, a, b) -> float:
        """DeepSSIM score of two 2D images (cosine of their embeddings)."""
        embeddings = self.embed([np.asarray(a), np.asarray(b)])
        return float(embeddings[0] @ embeddings[1])

    def explain(self, a, b, steps: int = 32, precision: str = "float32"):
        """Maps of where the score of (a, b) comes from: the attribution of the similarity lost
        (integrated gradients from a to b) and the local SSIM map; see :mod:`deepssim.embedding.explain`.
        Register b onto a first for a misaligned pair. precision: float32 or bfloat16 (autocast)."""
        from deepssim.embedding.explain import explain_pair

        return explain_pair(self, a, b, steps, precision)

    def matrix(self, train, generated, batch_size: int = 64) -> np.ndarray:
        """(N, M) scores of every (train, generated) pair."""
        return self.embed(train, batch_size) @ self.embed(generated, batch_size).T

    @torch.inference_mode()
    def _forward(self, images: np.ndarray, precision: str = "float32") -> np.ndarray:
        batch = prepare_input(images, self.input_channels).to(self.device, memory_format=torch.channels_last)
        autocast = precision == "bfloat16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            output = self._inference_network()(batch)
        return output.float().cpu().numpy()

    def _inference_network(self) -> torch.nn.Module:
        """The network with each batch norm folded into its convolution (torch.fx's ``fuse``): the
        same embeddings to ~1e-6, ~20% faster on a CPU. Rebuilt when a weight changes (training
        updates them in place); a network fx cannot trace, or TorchScript, is used as it is."""
        if isinstance(self.network, torch.jit.ScriptModule) or self.network.training:
            return self.network
        tensors = [*self.network.parameters(), *self.network.buffers()]
        versions = tuple((id(t), t._version) for t in tensors)
        if self._inference is None or self._inference[0] != versions:
            try:
                fused = fuse(self.network)
            except Exception:  # noqa: BLE001 - fx cannot trace every network; it then runs unfused
                fused = self.network
            self._inference = (versions, fused)
        return self._inference[1]


def prepare_input(images: np.ndarray, channels: int) -> torch.Tensor:
    """(B, H, W) raw images -> (B, channels, H, W) float32 z-scored network input."""
    batch = torch.from_numpy(np.asarray(images, dtype=np.float32))
    mean = batch.mean(dim=(1, 2), keepdim=True)
    centred = batch - mean
    # population sd from the centred pixels (torch's std over two dims took 5x as long as all the
    # rest); a NaN or Inf pixel makes its image's sd NaN (and std > 0 False). A constant image's
    # float32 mean need not be exact, which leaves its sd a rounding error above 0, so images
    # with so small an sd are checked by their range.
    std = centred.square().mean(dim=(1, 2), keepdim=True).sqrt()
    small = (std <= 1e-5 * mean.abs()).flatten()
    constant = bool(small.any()) and bool(torch.eq(*batch[small].flatten(1).aminmax(dim=1)).any())
    if constant or not bool(torch.all(std > 0)):
        raise DeepSSIMError("an image is constant or contains NaN/Inf values; it cannot be z-scored")
    return (centred / std).unsqueeze(1).expand(-1, channels, -1, -1)


class _ThreeChannelInput(torch.nn.Module):
    """Gives a one-channel network the authors' (B, 3, H, W) input convention."""

    def __init__(self, network: torch.nn.Module, input_channels: int):
        super().__init__()
        self.network = network
        self.input_channels = input_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x[:, : self.input_channels])


def _count(images) -> int:
    if hasattr(images, "read"):
        return len(images)
    if isinstance(images, np.ndarray):
        return 1 if images.ndim == 2 else len(images)
    return len(images)


def _check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise DeepSSIMError(f"unknown device {device!r}; use cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeepSSIMError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
