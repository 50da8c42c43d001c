"""DeepSSIM: find memorised copies of training images among generated medical images."""

from deepssim.embedding.model import DeepSSIM
from deepssim.errors import DeepSSIMError
from deepssim.io.load import ImageSet, LoadOptions, load_images
from deepssim.io.normalise import fit_to_size, zscore
from deepssim.scanning.decide import Thresholds
from deepssim.scanning.scan import ScanResult, scan
from deepssim.ssim.engine import prepare, ssim, ssim_blocks, ssim_matrix, ssim_pairs
from deepssim.ssim.matrix import SimilarityMatrix, compute_ssim_matrix

__version__ = "0.1.0"

__all__ = [
    "DeepSSIM",
    "DeepSSIMError",
    "ImageSet",
    "LoadOptions",
    "ScanResult",
    "SimilarityMatrix",
    "Thresholds",
    "compute_ssim_matrix",
    "fit_to_size",
    "load_images",
    "prepare",
    "scan",
    "ssim",
    "ssim_blocks",
    "ssim_matrix",
    "ssim_pairs",
    "zscore",
]
