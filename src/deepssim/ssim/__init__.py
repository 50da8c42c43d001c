"""Exact SSIM (scikit-image's definition on z-scored images): the engine and the N x M matrix job."""

from deepssim.ssim.engine import prepare, ssim, ssim_blocks, ssim_matrix, ssim_pairs

__all__ = ["prepare", "ssim", "ssim_blocks", "ssim_matrix", "ssim_pairs"]
