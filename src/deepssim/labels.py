"""The decision's vocabulary, kept once: the three classes and the paper's thresholds.

Classes are ordered by similarity (Different < Similar < Duplicate). Files name them
("Duplicate"); files written before this order existed used the codes 0 Different, 1 Duplicate,
2 Similar, and :meth:`Label.parse` still reads those codes.
"""

from __future__ import annotations

from enum import IntEnum

from deepssim.errors import DeepSSIMError


class Label(IntEnum):
    """A pair's (or a generated image's) class: score <= low Different, > high Duplicate."""

    DIFFERENT = 0
    SIMILAR = 1
    DUPLICATE = 2

    @property
    def title(self) -> str:
        """The name files and pages show: "Different", "Similar", "Duplicate"."""
        return self.name.capitalize()

    @classmethod
    def parse(cls, value: object) -> Label:
        """A label from a file cell: a name (any case) or a file code (0 Different, 1 Duplicate,
        2 Similar, as files have always numbered them)."""
        text = str(value).strip()
        if text.upper() in cls.__members__:
            return cls[text.upper()]
        if text in FILE_CODES:
            return FILE_CODES[text]
        raise DeepSSIMError(
            f"a label must be Different, Similar or Duplicate (or 0 Different, 1 Duplicate, 2 Similar), "
            f"not {text!r}"
        )

    @classmethod
    def titles(cls) -> tuple[str, ...]:
        return tuple(label.title for label in cls)


# The integer codes of label files (calibrate / evaluate pairs): kept as documented so old files
# keep their meaning.
FILE_CODES = {"0": Label.DIFFERENT, "1": Label.DUPLICATE, "2": Label.SIMILAR}

# The paper's thresholds, set for plain SSIM at the paper's resolution: (low, high).
PAPER_THRESHOLDS = (0.6, 0.85)
