"""From scores to decisions: the three classes, shares with confidence intervals, the
reference-distribution threshold and threshold calibration on labelled pairs.

Classes (as in the paper, :class:`deepssim.labels.Label`): score <= low is Different, score > high
is Duplicate, in between is Similar.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.io.files import write_text_atomic
from deepssim.labels import PAPER_THRESHOLDS, Label

REFERENCE_PERCENTILE = 95.0


# The scores a decision can use, as thresholds files name them: registered SSIM (the two-stage
# decision) or a metric's own score under its registry name (``--decision score``).
REGISTERED_SSIM = "registered-ssim"
# Registered SSIM's default Duplicate threshold rises as images get smaller: different subjects'
# registered SSIM reaches 0.88 at 64 px and 0.92 at 32 px (on the bundled sources; RESULTS,
# "Registered SSIM's null"), while from 128 px up it stays below the paper's 0.85.
REGISTERED_HIGH_PER_HALVING = 0.04
REGISTERED_FULL_RESOLUTION = 128  # px (geometric mean of height and width)


@dataclass(frozen=True)
class Thresholds:
    """low / high thresholds of one score, and where they came from.

    score: the score they belong to (``registered-ssim``, or a metric's name such as ``ssim`` or
    ``deepssim``); empty for thresholds given by hand, which then apply to whatever decides.
    image_shape: the image size they were calibrated at (registered SSIM and SSIM depend on it).
    model: the fingerprint of the embedding model whose score they belong to.
    """

    low: float
    high: float
    source: str = "paper"
    score: str = ""
    image_shape: tuple[int, int] | None = None
    model: str | None = None

    def __post_init__(self):
        check_threshold_values(self.low, self.high)

    def save(self, path: str | Path, **extra) -> None:
        record = {k: v for k, v in asdict(self).items() if k != "model"}
        record["image_shape"] = list(self.image_shape) if self.image_shape else None
        record["model_fingerprint"] = self.model
        write_text_atomic(path, json.dumps({**record, **extra}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Thresholds:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            shape = data.get("image_shape")
            return cls(
                float(data["low"]),
                float(data["high"]),
                f"calibrated ({Path(path).name})",
                score=str(data.get("score") or _legacy_score(data.get("metric"))),
                image_shape=tuple(int(v) for v in shape) if shape else None,
                model=data.get("model_fingerprint"),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise DeepSSIMError(
                f"{path}: not a thresholds file written by `deepssim calibrate` ({error})"
            ) from None

    def check_for(self, score: str, image_shape, model: str | None) -> None:
        """Refuse to decide ``score`` with thresholds made for another score, model or image size."""
        if not self.score:
            return
        remedy = "make matching thresholds with: deepssim calibrate --labels LABELS_DIR (or --pairs) " + (
            f"--metric {score}" if score != REGISTERED_SSIM else "--metric registered"
        )
        if self.score != score:
            raise DeepSSIMError(
                f"the thresholds ({self.source}) were calibrated for {self.score}, but this scan decides "
                f"with {score}; {remedy}"
            )
        if self.model and model and self.model != model:
            raise DeepSSIMError(
                f"the thresholds ({self.source}) belong to another {score} model "
                f"(fingerprint {self.model[:12]}, this one {model[:12]}); {remedy}"
            )
        if self.image_shape and image_shape and tuple(self.image_shape) != tuple(image_shape):
            h, w = self.image_shape
            raise DeepSSIMError(
                f"the thresholds ({self.source}) were calibrated on {h}x{w} images, these are "
                f"{image_shape[0]}x{image_shape[1]}: {score} depends on the image size; {remedy}"
            )


def check_threshold_values(low: float | None, high: float | None) -> None:
    """Refuse thresholds no score can use (either may be None: not given)."""
    for name, value in (("low", low), ("high", high)):
        if value is not None and not np.isfinite(value):
            raise DeepSSIMError(f"thresholds must be finite numbers, not {name} {value}")
    if low is not None and high is not None and not low <= high:
        raise DeepSSIMError(f"the low threshold ({low}) must not exceed the high one ({high})")
    for name, value in (("low", low), ("high", high)):
        if value is not None and value < -1:
            raise DeepSSIMError(f"the {name} threshold ({value}) is below every score's range (-1 to 1)")
    if low is not None and low >= 1:
        raise DeepSSIMError(f"the low threshold ({low}) is at or above every score (scores are at most 1)")
    if high is not None and high >= 1:
        raise DeepSSIMError(
            f"the high threshold ({high}) is one no score can exceed (scores are at most 1), "
            "so nothing would ever be a Duplicate; choose a value below 1"
        )


def _legacy_score(metric: str | None) -> str:
    """Files written before thresholds named their score recorded the metric calibrated."""
    if not metric:
        return ""
    return REGISTERED_SSIM if metric == "registered" else metric


def default_thresholds(score: str, image_shape, published: tuple[float, float] | None) -> Thresholds | None:
    """The defaults of ``score`` for images of ``image_shape``: registered SSIM's (low 0.6, high 0.85
    from 128 px up, +0.04 per halving of the size below), else the metric's ``published`` ones
    (the paper's 0.6 / 0.85 for plain SSIM), or None when there are none."""
    if score == REGISTERED_SSIM:
        low, high = PAPER_THRESHOLDS
        if image_shape is not None:
            side = float(np.sqrt(image_shape[0] * image_shape[1]))
            high += REGISTERED_HIGH_PER_HALVING * max(0.0, np.log2(REGISTERED_FULL_RESOLUTION / side))
            high = min(round(high, 4), 0.99)
        where = f" at {image_shape[0]}x{image_shape[1]}" if image_shape is not None else ""
        return Thresholds(low, high, f"registered SSIM default{where}", score=REGISTERED_SSIM)
    if published is None:
        return None
    return Thresholds(
        *published, "paper" if tuple(published) == PAPER_THRESHOLDS else "published", score=score
    )


def classify(scores, thresholds: Thresholds) -> np.ndarray:
    """The :class:`Label` code of each score (an integer array of the scores' shape)."""
    scores = np.asarray(scores)
    return np.where(
        scores > thresholds.high,
        Label.DUPLICATE,
        np.where(scores <= thresholds.low, Label.DIFFERENT, Label.SIMILAR),
    ).astype(np.int64)


def decide(decision_scores: np.ndarray, thresholds: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """The decide stage, shared by the scan, the monitor and the release filter: each generated
    image's class comes from its best pair. ``decision_scores`` (M, k) -> (order, classes):
    ``order`` sorts each row's pairs by decision score, best first (missing scores last), and
    ``classes`` (M,) are the :class:`Label` codes of each row's best score."""
    scores = np.nan_to_num(np.asarray(decision_scores, dtype=np.float64), nan=-np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    best = np.take_along_axis(scores, order[:, :1], axis=1)[:, 0]
    return order, classify(best, thresholds)


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sensible at 0 and n)."""
    if total == 0:
        return (0.0, 1.0)
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def share(count: int, total: int) -> dict:
    low, high = wilson_interval(count, total)
    return {"count": int(count), "share": count / total if total else 0.0, "ci95": [low, high]}


def reference_threshold(reference_scores, percentile: float = REFERENCE_PERCENTILE) -> float:
    """Dar et al.'s rule: the given percentile of held-out real images' best training scores."""
    reference_scores = np.asarray(reference_scores)
    if reference_scores.size == 0:
        raise DeepSSIMError("the reference set is empty")
    return float(np.percentile(reference_scores, percentile))


def conformal_threshold(null_scores, false_positive_rate: float) -> float:
    """The Duplicate threshold with a finite-sample false-positive guarantee.

    null_scores: n scores of pairs known to be different patients (each training image's best
    score against the training images of other groups). Returns their ceil((n + 1)(1 - rate))-th
    smallest value t. If a new different-patient score is exchangeable with the n (split
    conformal prediction), P(score > t) <= rate, whatever the score's distribution.
    """
    scores = np.sort(np.asarray(null_scores, dtype=np.float64))
    if not 0 < false_positive_rate < 1:
        raise DeepSSIMError(f"the false-positive rate must be in (0, 1), not {false_positive_rate}")
    rank = int(np.ceil((len(scores) + 1) * (1 - false_positive_rate)))
    if rank > len(scores):
        need = int(np.ceil(1 / false_positive_rate)) - 1
        raise DeepSSIMError(
            f"{len(scores)} different-patient scores are too few for a false-positive rate of "
            f"{false_positive_rate:g}; it needs at least {need} training images (or raise the rate)"
        )
    return float(scores[rank - 1])


def calibrate(scores, labels, max_candidates: int = 400) -> tuple[Thresholds, float]:
    """Thresholds (low, high) maximising macro-F1 of the three classes on labelled pairs.

    Candidates are midpoints between distinct sorted scores (within the scores' range -1 to 1);
    when there are more than ``max_candidates``, they are thinned to that many quantiles of each
    class's scores, so a rare class keeps fine cut points. Every pair low <= high is scored at once
    from cumulative class counts; macro-F1 averages over the classes present in ``labels`` (as
    scikit-learn's ``f1_score(average="macro", labels=present)``). Returns the thresholds and F1.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.shape != labels.shape or scores.size == 0:
        raise DeepSSIMError("calibration needs one score per label and at least one pair")
    unknown = set(np.unique(labels).tolist()) - set(Label)
    if unknown:
        raise DeepSSIMError(
            f"labels must be Label codes ({', '.join(Label.titles())}); found {sorted(unknown)}"
        )
    cuts = _candidate_cuts(scores, labels, max_candidates)
    present = sorted(set(labels.tolist()))
    # at_or_below[c, j]: pairs of class c scoring <= cuts[j]
    at_or_below = np.stack([np.searchsorted(np.sort(scores[labels == c]), cuts, side="right") for c in Label])
    total = at_or_below.sum(axis=0)
    actual = np.array([(labels == c).sum() for c in Label])
    low, high = np.triu_indices(len(cuts))  # every pair of cut indices with low <= high
    predicted = {
        Label.DIFFERENT: total[low],
        Label.SIMILAR: total[high] - total[low],
        Label.DUPLICATE: len(scores) - total[high],
    }
    correct = {
        Label.DIFFERENT: at_or_below[Label.DIFFERENT, low],
        Label.SIMILAR: at_or_below[Label.SIMILAR, high] - at_or_below[Label.SIMILAR, low],
        Label.DUPLICATE: actual[Label.DUPLICATE] - at_or_below[Label.DUPLICATE, high],
    }
    f1 = np.zeros(len(low))
    for c in present:
        denominator = predicted[c] + actual[c]
        f1 += np.where(denominator > 0, 2 * correct[c] / np.maximum(denominator, 1), 0.0)
    f1 /= len(present)
    best = int(np.argmax(f1))  # the first best, as a loop over low then high finds it
    thresholds = Thresholds(float(cuts[low[best]]), float(cuts[high[best]]), "calibrated")
    return thresholds, float(f1[best])


def _candidate_cuts(scores: np.ndarray, labels: np.ndarray, max_candidates: int) -> np.ndarray:
    distinct = np.unique(scores)
    cuts = np.concatenate([[distinct[0] - 1e-6], (distinct[:-1] + distinct[1:]) / 2, [distinct[-1] + 1e-6]])
    if len(cuts) > max_candidates:
        per_class = max(2, max_candidates // len(np.unique(labels)))
        kept = [cuts[0], cuts[-1]]
        for label in np.unique(labels):
            own = scores[labels == label]
            inside = cuts[(cuts >= own.min()) & (cuts <= own.max())]
            if len(inside):
                kept.extend(np.quantile(inside, np.linspace(0, 1, per_class), method="nearest"))
        cuts = np.unique(kept)
    return np.unique(np.clip(cuts, -1.0, np.nextafter(1.0, 0.0)))


def calibration_intervals(scores, labels, repeats: int = 200, seed: int = 0) -> dict:
    """95% bootstrap intervals of the calibrated low and high thresholds (pairs resampled with
    replacement, ``repeats`` times, seeded)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    rng = np.random.default_rng(seed)
    lows, highs = [], []
    for _ in range(repeats):
        rows = rng.integers(0, len(scores), len(scores))
        found, _ = calibrate(scores[rows], labels[rows])
        lows.append(found.low)
        highs.append(found.high)
    return {
        "low_ci95": [float(v) for v in np.percentile(lows, [2.5, 97.5])],
        "high_ci95": [float(v) for v in np.percentile(highs, [2.5, 97.5])],
        "bootstrap_repeats": repeats,
    }
