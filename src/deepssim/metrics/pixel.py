"""Pixel metrics: scores of matched, same-sized pairs computed from the pixels themselves."""

from __future__ import annotations

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.extras import require
from deepssim.io.normalise import unit_range
from deepssim.labels import PAPER_THRESHOLDS
from deepssim.metrics.base import SimilarityMetric, register
from deepssim.ssim.engine import ssim_pairs


@register("ssim")
class SSIMMetric(SimilarityMetric):
    thresholds = PAPER_THRESHOLDS
    description = "SSIM (scikit-image defaults, z-scored images, data range of the training image)"
    exhaustive_search = True

    def pair_scores(self, train, generated):
        return ssim_pairs(train, generated)


@register("fsim")
class FSIMMetric(SimilarityMetric):
    """The published FSIM (Zhang et al. 2011): phase congruency (log-Gabor filters, 4 scales x 4
    orientations) and gradient magnitude, as implemented by ``piq`` after the authors' MATLAB
    code; grayscale (FSIM, not FSIMc). Each image is min-max scaled to [0, 1] first."""

    thresholds = None  # the paper gives no FSIM thresholds: calibrate them
    description = "FSIM, Zhang et al. 2011, with phase congruency (piq implementation)"

    def pair_scores(self, train, generated, batch_size: int = 64):
        piq = require("piq")

        train, generated = np.asarray(train, dtype=np.float64), np.asarray(generated, dtype=np.float64)
        if train.shape != generated.shape:
            raise DeepSSIMError(
                f"FSIM needs pairs of one size; got {train.shape[1:]} and {generated.shape[1:]}"
            )
        scores = []
        for start in range(0, len(train), batch_size):
            a = unit_range(train[start : start + batch_size])
            b = unit_range(generated[start : start + batch_size])
            scores.append(piq.fsim(a, b, data_range=1.0, reduction="none", chromatic=False).numpy())
        return np.concatenate(scores).astype(np.float64)


@register("registered")
class RegisteredSSIMMetric(SimilarityMetric):
    """Registered SSIM (:mod:`deepssim.ssim.registered`): SSIM after the flip, rotation, shift,
    scale and contrast gamma that best bring the generated image into register. Pairs only; in a
    scan it is the second stage of the default decision."""

    thresholds = PAPER_THRESHOLDS
    description = "registered SSIM (SSIM after rigid and contrast registration)"

    def pair_scores(self, train, generated):
        from deepssim.ssim.registered import register_pairs

        return register_pairs(
            np.asarray(train, dtype=np.float64), np.asarray(generated, dtype=np.float64)
        ).ssim_registered
