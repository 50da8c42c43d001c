"""DeepSSIM: find memorised copies of training images among generated medical images.

The public API, loaded lazily (importing ``deepssim`` loads neither torch nor any metric until a
name is used):

    from deepssim import scan, ScanSettings
    result = scan("train/", "generated/", settings=ScanSettings(k=10, group_by="volume"))
    result.save("scan-output")
"""

from __future__ import annotations

import importlib

from deepssim._version import __version__
from deepssim.errors import DeepSSIMError

# public name -> the module that defines it
_EXPORTS = {
    "scan": "deepssim.scanning.scan",
    "ScanResult": "deepssim.scanning.scan",
    "scan_volumes": "deepssim.scanning.volumes",
    "VolumeScanSettings": "deepssim.scanning.volumes",
    "register_volumes": "deepssim.ssim.registered3d",
    "ScanSettings": "deepssim.scanning.settings",
    "ScanSummary": "deepssim.scanning.summary",
    "Thresholds": "deepssim.scanning.decide",
    "Label": "deepssim.labels",
    "PAPER_THRESHOLDS": "deepssim.labels",
    "DeepSSIM": "deepssim.embedding.model",
    "register_pairs": "deepssim.ssim.registered",
    "registered_ssim": "deepssim.ssim.registered",
    "Registration": "deepssim.ssim.registered",
    "RegistrationSettings": "deepssim.ssim.registered",
    "ssim": "deepssim.ssim.engine",
    "ssim_matrix": "deepssim.ssim.engine",
    "ssim_pairs": "deepssim.ssim.engine",
    "SimilarityMatrix": "deepssim.ssim.matrix",
    "compute_ssim_matrix": "deepssim.ssim.matrix",
    "ImageSet": "deepssim.io.load",
    "LoadOptions": "deepssim.io.load",
    "load_images": "deepssim.io.load",
    "Registry": "deepssim.registry",
}

__all__ = ["DeepSSIMError", "__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deepssim' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
