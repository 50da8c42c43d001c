"""Optional dependencies: each lives in a pip extra, and a missing one is a one-line error naming it."""

from __future__ import annotations

import importlib

from deepssim.errors import DeepSSIMError

EXTRAS = {  # top-level module -> the extra that installs it
    "kornia": "train",
    "piq": "baselines",
    "open_clip": "baselines",
    "monai": "ldm",
    "einops": "ldm",
    "faiss": "faiss",
    "ray": "ray",
    "pyarrow": "ray",
}


def require(module: str):
    """Import ``module``, or stop with the pip command that installs its extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS[module.split(".")[0]]
        raise DeepSSIMError(
            f"{module.split('.')[0]} is not installed; it comes with the '{extra}' extra: "
            f"pip install 'deepssim[{extra}]'"
        ) from None
