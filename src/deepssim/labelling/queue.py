"""Which of a scan's pairs a rater sees, in which order, and the images they see.

The pairs come from the scan's ``pairs.csv``. The sample is stratified over the decision score
(ten equal-width bins, each bin's pairs weighted so that every bin is drawn about equally) with
extra weight near the scan's two thresholds, where a label changes a class the most. The draw
takes a seed, so every rater of one labels folder sees the same pairs in the same order (the
folder stores the order once it is drawn).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.io.files import unescape_cell
from deepssim.io.load import ImageSet, LoadOptions

SCORE_BINS = 10
NEAR_THRESHOLD = 0.05  # width (in score) of the extra weight around each threshold
THRESHOLD_WEIGHT = 3.0  # a pair on a threshold weighs this much more than one far from both


@dataclass(frozen=True)
class QueuedPair:
    """One pair to label; ``score`` is kept for sampling and analysis, never shown before a click."""

    train_key: str
    generated_key: str
    score: float
    transform: str


@dataclass
class ScanPairs:
    """A finished scan's top-k pairs, thresholds and inputs, read from its output folder."""

    folder: Path
    pairs: list[QueuedPair]
    low: float
    high: float
    inputs: dict[str, list[str]]
    options: LoadOptions

    @classmethod
    def read(cls, folder: str | Path) -> ScanPairs:
        folder = Path(folder).resolve()
        summary_path, pairs_path = folder / "summary.json", folder / "pairs.csv"
        if not summary_path.is_file() or not pairs_path.is_file():
            raise DeepSSIMError(f"{folder}: not a scan output folder (needs summary.json and pairs.csv)")
        try:
            audit = json.loads(summary_path.read_text())["audit"]
            settings = audit["settings"]
        except (ValueError, KeyError):
            raise DeepSSIMError(
                f"{summary_path}: not a scan summary (no audit trail); rerun the scan"
            ) from None
        with open(pairs_path, newline="", encoding="utf-8") as handle:
            rows = [{k: unescape_cell(v) for k, v in row.items()} for row in csv.DictReader(handle)]
        column = "decision_score"  # files of older versions: the score the decision used
        if rows and column not in rows[0]:
            column = "ssim_registered" if settings.get("decision") == "two-stage" else "score"
        pairs = [
            QueuedPair(
                row["train_key"], row["generated_key"], _number(row.get(column)), row.get("transform", "")
            )
            for row in rows
        ]
        pairs = [p for p in pairs if np.isfinite(p.score)]
        if not pairs:
            raise DeepSSIMError(f"{pairs_path}: no scored pairs to label")
        inputs = {
            role: record.get("absolute") or record.get("given", [])
            for role, record in audit["inputs"].items()
        }
        loading = dict(settings.get("loading", {}))
        for name in ("size", "slice_range"):
            if loading.get(name) is not None:
                loading[name] = tuple(loading[name])
        thresholds = settings["thresholds"]
        return cls(folder, pairs, thresholds["low"], thresholds["high"], inputs, LoadOptions(**loading))


def choose_pairs(scores: np.ndarray, count: int, low: float, high: float, *, seed: int = 0) -> np.ndarray:
    """Indices of ``count`` pairs (all if fewer), in the order to show them.

    Stratified over ``SCORE_BINS`` equal-width bins of the score, with weight up to
    ``THRESHOLD_WEIGHT`` times higher within ~``NEAR_THRESHOLD`` of ``low`` or ``high``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    count = min(count, len(scores))
    edges = np.linspace(scores.min(), scores.max() + 1e-12, SCORE_BINS + 1)
    bins = np.clip(np.digitize(scores, edges) - 1, 0, SCORE_BINS - 1)
    per_bin = np.bincount(bins, minlength=SCORE_BINS)
    distance = np.minimum(np.abs(scores - low), np.abs(scores - high))
    weight = (1.0 + (THRESHOLD_WEIGHT - 1.0) * np.exp(-((distance / NEAR_THRESHOLD) ** 2))) / per_bin[bins]
    rng = np.random.default_rng(seed)
    return rng.choice(len(scores), size=count, replace=False, p=weight / weight.sum())


class PairImages:
    """The training and generated images of queued pairs, read from the scan's inputs on demand."""

    def __init__(self, inputs: dict[str, list[str]], options: LoadOptions):
        self.sets = {}
        for role in ("training", "generated"):
            paths = inputs.get(role) or []
            missing = [p for p in paths if not Path(p).exists()]
            if not paths or missing:
                flag = "--train" if role == "training" else "--generated"
                raise DeepSSIMError(
                    f"the scan's {role} images are not at {', '.join(missing or ['(not recorded)'])}; "
                    f"pass their location with {flag}"
                )
            images = ImageSet.from_paths(paths, options)
            self.sets[role] = (images, {key: i for i, key in enumerate(images.keys)})

    def image(self, role: str, key: str) -> np.ndarray:
        """One image of a queued pair (:meth:`check` has made sure every one is there)."""
        images, index = self.sets[role]
        return images.take([index[key]])[0]

    def check(self, pairs: list[QueuedPair]) -> None:
        """Fail now, not in the middle of labelling, when an input lost an image of the queue."""
        for pair in pairs:
            for role, key in (("training", pair.train_key), ("generated", pair.generated_key)):
                if key not in self.sets[role][1]:
                    raise DeepSSIMError(f"{role} image {key!r} of the scan is no longer among its inputs")


def _number(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")
