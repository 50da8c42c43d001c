"""The scan's settings: one frozen, validated dataclass that the API, the CLI's defaults and the
summary's audit trail all read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deepssim.errors import DeepSSIMError
from deepssim.settings import check_literal_fields, choices

Decision = Literal["two-stage", "score"]
Search = Literal["exact", "faiss", "faiss-hnsw"]
Precision = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ScanSettings:
    """How to scan (everything but the data, the model and the thresholds). See :func:`scan`."""

    decision: Decision = "two-stage"
    k: int = 5
    use_reference_threshold: bool = False
    verify: bool = False
    group_by: str | None = None
    duplicate_fpr: float | None = None
    search: Search = "exact"
    batch_size: int = 64
    precision: Precision = "auto"
    device: str = "cpu"
    engine: str = "local"  # a name in deepssim.scanning.engines.ENGINES

    def __post_init__(self) -> None:
        check_literal_fields(self)
        from deepssim.scanning.engines import ENGINES

        if self.engine not in ENGINES:
            raise DeepSSIMError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.k < 1 or self.batch_size < 1:
            raise DeepSSIMError("k and the batch size must be at least 1")
        if self.duplicate_fpr is not None and not 0 < self.duplicate_fpr < 1:
            raise DeepSSIMError(f"the false-positive rate must be in (0, 1), not {self.duplicate_fpr}")
        if self.duplicate_fpr is not None and self.group_by is None:
            raise DeepSSIMError("--duplicate-fpr needs --group-by: different patients are different groups")

    @classmethod
    def choices(cls, name: str) -> tuple[str, ...]:
        """The allowed values of a Literal field, for the CLI."""
        return choices(cls, name)
