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
from deepssim.labels import Label

REFERENCE_PERCENTILE = 95.0


@dataclass(frozen=True)
class Thresholds:
    """low / high score thresholds and where they came from."""

    low: float
    high: float
    source: str = "paper"

    def __post_init__(self):
        if not self.low <= self.high:
            raise DeepSSIMError(f"the low threshold ({self.low}) must not exceed the high one ({self.high})")

    def save(self, path: str | Path, **extra) -> None:
        write_text_atomic(path, json.dumps({**asdict(self), **extra}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Thresholds:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(float(data["low"]), float(data["high"]), f"calibrated ({Path(path).name})")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DeepSSIMError(
                f"{path}: not a thresholds file written by `deepssim calibrate` ({error})"
            ) from None


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


def calibrate(scores, labels, max_candidates: int = 100) -> tuple[Thresholds, float]:
    """Thresholds (low, high) maximising macro-F1 of the three classes on labelled pairs.

    Candidates are midpoints between distinct sorted scores; when there are more than
    ``max_candidates``, they are thinned to that many quantiles of each class's scores, so a
    rare class (usually Duplicate) keeps fine cut points. Every pair low <= high is tried;
    macro-F1 averages over the classes present in ``labels``. Returns the thresholds and F1.
    """
    from sklearn.metrics import f1_score

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.shape != labels.shape or scores.size == 0:
        raise DeepSSIMError("calibration needs one score per label and at least one pair")
    unknown = set(np.unique(labels).tolist()) - set(Label)
    if unknown:
        raise DeepSSIMError(
            f"labels must be Label codes ({', '.join(Label.titles())}); found {sorted(unknown)}"
        )
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
    present = sorted(set(labels.tolist()))
    best = (-1.0, cuts[0], cuts[0])
    for i, low in enumerate(cuts):
        for high in cuts[i:]:
            predicted = classify(scores, Thresholds(low, high))
            f1 = f1_score(labels, predicted, labels=present, average="macro", zero_division=0)
            if f1 > best[0]:
                best = (f1, low, high)
    f1, low, high = best
    return Thresholds(float(low), float(high), "calibrated"), float(f1)
