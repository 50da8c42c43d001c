"""Checkpoints as two files side by side: ``NAME.safetensors`` (tensors only, never unpickled)
and ``NAME.json`` (the configuration, with a ``format`` tag). Shared by DeepSSIM models and the
Dar et al. baseline."""

from __future__ import annotations

import json
from pathlib import Path

from deepssim.errors import DeepSSIMError
from deepssim.io.files import atomic_path, write_text_atomic


def save_checkpoint(state: dict, config: dict, path: str | Path) -> Path:
    """Write the tensors of ``state`` and ``config`` atomically; returns the weights path."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path, suffix=".safetensors") as temporary:
        save_file(tensors, str(temporary), metadata={"format": str(config.get("format", ""))})
    write_text_atomic(path.with_suffix(".json"), json.dumps(config, indent=2) + "\n")
    return path


def load_checkpoint(
    path: str | Path, format_tag: str, what: str, max_version: int = 1
) -> tuple[dict, dict, Path]:
    """(tensors, config, weights path) of a checkpoint whose config's ``format`` is ``format_tag``.

    Every failure is a :class:`DeepSSIMError` naming the file; ``what`` names the kind of checkpoint,
    e.g. "a DeepSSIM checkpoint (written by `deepssim train`)".
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = Path(path).with_suffix(".safetensors")
    config_path = weights_path.with_suffix(".json")
    if not weights_path.is_file() or not config_path.is_file():
        raise DeepSSIMError(
            f"{weights_path.with_suffix('')}: {what} needs .safetensors and .json files side by side"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DeepSSIMError(f"{config_path}: not a readable JSON configuration ({error})") from None
    if not isinstance(config, dict) or config.get("format") != format_tag:
        raise DeepSSIMError(f"{config_path}: not {what}")
    if config.get("format_version", 0) > max_version:
        raise DeepSSIMError(f"{config_path}: written by a newer deepssim; upgrade deepssim to load it")
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as error:
        raise DeepSSIMError(
            f"{weights_path}: cannot read the weights ({error}); the file may be truncated or corrupt"
        ) from None
    return state, config, weights_path
