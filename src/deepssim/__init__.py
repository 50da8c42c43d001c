"""DeepSSIM: find memorised copies of training images among generated medical images."""

from deepssim.decide import Thresholds
from deepssim.errors import DeepSSIMError
from deepssim.load import ImageSet, LoadOptions, load_images
from deepssim.model import DeepSSIM
from deepssim.normalise import fit_to_size, zscore
from deepssim.pairwise import SimilarityMatrix, compute_ssim_matrix
from deepssim.scan import ScanResult, scan
from deepssim.ssim import prepare, ssim, ssim_blocks, ssim_matrix, ssim_pairs

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
