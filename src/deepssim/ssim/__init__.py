"""Exact SSIM (scikit-image's definition on z-scored images): the engine, the N x M matrix job and
registered SSIM.

``deepssim.ssim`` is both this package and the public function ``deepssim.ssim(a, b)``: Python
binds a subpackage to its parent's attribute of the same name once it is imported, so the package
itself is made callable and computes the SSIM of one pair.
"""

import sys
import types

from deepssim.ssim.engine import prepare, ssim, ssim_blocks, ssim_matrix, ssim_pairs

__all__ = ["prepare", "ssim", "ssim_blocks", "ssim_matrix", "ssim_pairs"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return ssim(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
