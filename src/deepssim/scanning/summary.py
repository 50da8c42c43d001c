"""The scan's summary: the numbers a paper needs, as one typed object saved as ``summary.json``.

Class shares with 95% Wilson intervals, memorised training images (those whose best decision
score over all generated images is a Duplicate), score percentiles, the reference or
different-patient distributions, patients with a Duplicate and the audit trail.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from deepssim.labels import Label
from deepssim.scanning.decide import REFERENCE_PERCENTILE, Thresholds, reference_threshold, share

PERCENTILES = (0, 5, 25, 50, 75, 95, 100)


COPY_COUNTS_LOWER_BOUND = (
    "lower bounds: the registration cascade stops at each generated image's first copy, so a "
    "training image copied only by images already found Duplicate is not counted; "
    "--registration full counts every copy"
)


@dataclass
class ScanSummary:
    """What ``summary.json`` holds; optional parts are None when the scan did not compute them."""

    metric: str
    model: str
    training_images: int
    generated_images: int
    k: int
    search: str
    thresholds: dict
    generated_by_class: dict  # class title -> share entry (count, share, ci95), Duplicate first
    training_images_with_a_duplicate: dict
    best_score_percentiles: dict
    skipped_images: dict
    decision: str
    precision: str
    reference: dict | None = None
    groups: dict | None = None
    reidentification: dict | None = None
    different_patient_scores: dict | None = None
    audit: dict | None = None
    seconds: float | None = None
    seconds_by_stage: dict | None = None
    fit: dict | None = None
    # set where the training images (and patients) with a Duplicate are counted only as far as the
    # registration cascade looked: what the counts are then, for every output that shows them
    copy_counts: str | None = None

    @property
    def at_least(self) -> str:
        """What precedes the counts of copied training images and patients: "at least " where
        they are lower bounds (``copy_counts``)."""
        return "at least " if self.copy_counts else ""

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def reference_threshold(self) -> float | None:
        if self.reference is None:
            return None
        return next(v for k, v in self.reference.items() if k.endswith("_threshold"))

    def text(self) -> str:
        """A few lines for the terminal."""
        thresholds = self.thresholds
        lines = [
            f"{self.generated_images} generated vs {self.training_images} training images, "
            f"{self.metric} ({self.model}), thresholds {thresholds['low']:.4g} / "
            f"{thresholds['high']:.4g} ({thresholds['source']})",
            f"  decision: {self.decision}",
        ]
        for name, entry in self.generated_by_class.items():
            low, high = entry["ci95"]
            lines.append(
                f"  {name:<10} {entry['count']:>7}  {entry['share']:6.1%}  (95% CI {low:.1%} - {high:.1%})"
            )
        memorised = self.training_images_with_a_duplicate
        low, high = memorised["ci95"]
        lines.append(
            f"  training images with at least one Duplicate: {self.at_least}{memorised['count']} of "
            f"{self.training_images} ({memorised['share']:.1%}, 95% CI {low:.1%} - {high:.1%})"
        )
        if self.groups is not None:
            entry = self.groups["with_a_duplicate"]
            low, high = entry["ci95"]
            lines.append(
                f"  patients ({self.groups['by']}) with at least one Duplicate: {self.at_least}"
                f"{entry['count']} of {self.groups['groups']} ({entry['share']:.1%}, "
                f"95% CI {low:.1%} - {high:.1%})"
            )
        if self.copy_counts:
            lines.append(f"  ({self.copy_counts})")
        if self.reidentification is not None:
            entry = self.reidentification["generated_images"]
            lines.append(
                f"  generated images closer to one patient than other patients get: {entry['count']} "
                f"({entry['share']:.1%}), {self.reidentification['patients']} patient(s)"
            )
        if self.reference is not None:
            lines.append(f"  reference 95th percentile of best scores: {self.reference_threshold():.4f}")
        return "\n".join(lines)


def summarise(
    *,
    metric: str,
    model: str,
    train_set,
    generated_set,
    decided: np.ndarray,
    classes: np.ndarray,
    best_per_train: np.ndarray,
    thresholds: Thresholds,
    reference_scores,
    search: str,
    decision: str,
    precision: str,
    copies_counted_until_first: bool = False,
) -> ScanSummary:
    """The summary of decision scores ``decided`` (M, k), best first in each row, and the classes
    the decide stage gave each generated image. ``copies_counted_until_first``: the registration
    cascade stopped at each generated image's first copy, so copied training images are a lower bound."""
    m, n = len(generated_set), len(train_set)
    memorised = np.flatnonzero(best_per_train > thresholds.high)
    summary = ScanSummary(
        metric=metric,
        model=model,
        training_images=n,
        generated_images=m,
        k=int(decided.shape[1]),
        search="exact SSIM, blocked" if metric == "ssim" else search,
        thresholds={"low": thresholds.low, "high": thresholds.high, "source": thresholds.source},
        generated_by_class={
            label.title: share(int((classes == label).sum()), m) for label in reversed(Label)
        },
        training_images_with_a_duplicate=share(len(memorised), n),
        best_score_percentiles=percentiles(decided[:, 0]),
        skipped_images={"training": len(train_set.skipped), "generated": len(generated_set.skipped)},
        decision=decision,
        precision=precision,
        copy_counts=COPY_COUNTS_LOWER_BOUND if copies_counted_until_first else None,
    )
    if reference_scores is not None:
        summary.reference = {
            "description": "each training image's best score against the held-out real images",
            "training_images": int(len(reference_scores)),
            "best_score_percentiles": percentiles(reference_scores),
            f"p{REFERENCE_PERCENTILE:g}_threshold": reference_threshold(reference_scores),
        }
    return summary


def percentiles(values, levels=PERCENTILES) -> dict:
    return {f"p{p}": float(np.percentile(values, p)) for p in levels}
