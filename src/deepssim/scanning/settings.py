"""The scan's settings: one frozen, validated dataclass that the API, the CLI's options and the
summary's audit trail all read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from deepssim.errors import DeepSSIMError
from deepssim.execution import ENGINES, SEARCH_BACKENDS
from deepssim.hardware import PRECISIONS
from deepssim.settings import check_literal_fields, choices, option

Decision = Literal["two-stage", "score"]
Precision = Literal[PRECISIONS]


@dataclass(frozen=True)
class ScanSettings:
    """How to scan (everything but the data, the model and the thresholds). See :func:`scan`."""

    decision: Decision = field(
        default="two-stage",
        metadata=option(
            "two-stage: the metric retrieves the top-k, registered SSIM (after the best flip, rotation, "
            "shift and scale) decides; score: the metric's score decides (faster)"
        ),
    )
    k: int = field(  # 10: recall@10 of misaligned copies is 1.00 on every held-out source, @5 0.95
        default=10, metadata=option("training matches kept per generated image", flag="--top-k", short="-k")
    )
    use_reference_threshold: bool = field(
        default=False,
        metadata=option(
            "use the 95th percentile of the reference images' best scores as the high threshold",
            flag="--reference-threshold",
        ),
    )
    registration: Literal["full", "cascade"] = field(
        default="cascade",
        metadata=option(
            "two-stage registration: cascade registers each generated image's pairs in retrieval order "
            "until one is a Duplicate (the classes of full by construction); full registers every "
            "top-k pair (every pair's exact score, for audits)"
        ),
    )
    verify: bool = field(
        default=False,
        metadata=option(
            "with --decision score: also compute registered and plain SSIM of every top-k pair "
            "(always done for Duplicates, and for every pair in the two-stage decision)"
        ),
    )
    group_by: str | None = field(
        default=None,
        metadata=option(
            "group training images into patients: volume, folder, or a regex with one capturing group, the "
            "patient ID in each key (e.g. 'sub-(\\d+)'); adds groups.csv and a patient table"
        ),
    )
    duplicate_fpr: float | None = field(
        default=None,
        metadata=option(
            "set the Duplicate threshold without labels: at most this share of different-patient "
            "matches (training images of other groups) are called Duplicate (needs --group-by)"
        ),
    )
    reidentify: bool = field(
        default=False,
        metadata=option(
            "with --group-by: flag generated images closer to their best match's patient than any "
            "other patient's image gets to that patient (patient re-identification; its own column "
            "and count, not a class)"
        ),
    )
    exact_candidates: int = field(
        default=0,
        metadata=option(
            "also register each generated image's N best training images by exact SSIM over every pair "
            "(in 4 flips): copies the retriever ranks low are decided too, at the cost of every pair's "
            "exact SSIM four times (0: off)"
        ),
    )
    search: str = field(
        default="exact", metadata=option("nearest-neighbour search", choices=SEARCH_BACKENDS.names)
    )
    batch_size: int = field(default=64, metadata=option("images per embedding batch"))
    precision: Precision = field(
        default="auto", metadata=option("auto: bfloat16 only where the hardware computes it natively")
    )
    device: str = field(default="cpu", metadata=option("cpu or cuda"))
    engine: str = field(
        default="local",
        metadata=option(
            "where the work runs: local (this process) or ray (a Ray cluster; pip install 'deepssim[ray]')",
            choices=ENGINES.names,
        ),
    )

    def __post_init__(self) -> None:
        check_literal_fields(self)
        ENGINES[self.engine]  # an unknown name is an error that lists the engines
        SEARCH_BACKENDS[self.search]
        if self.k < 1:
            raise DeepSSIMError(f"--top-k must be at least 1, not {self.k}")
        if self.exact_candidates < 0:
            raise DeepSSIMError(f"--exact-candidates must be 0 or more, not {self.exact_candidates}")
        if self.batch_size < 1:
            raise DeepSSIMError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.group_by not in (None, "volume", "folder"):
            from deepssim.scanning.groups import group_pattern

            group_pattern(self.group_by)
        if self.duplicate_fpr is not None and not 0 < self.duplicate_fpr < 1:
            raise DeepSSIMError(f"the false-positive rate must be in (0, 1), not {self.duplicate_fpr}")
        if self.duplicate_fpr is not None and self.group_by is None:
            raise DeepSSIMError("--duplicate-fpr needs --group-by: different patients are different groups")
        if self.reidentify and self.group_by is None:
            raise DeepSSIMError("--reidentify needs --group-by: it compares patients")

    @classmethod
    def choices(cls, name: str) -> tuple[str, ...]:
        """The allowed values of a Literal field."""
        return choices(cls, name)
