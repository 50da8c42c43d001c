"""One rule for deriving seeds, so every seeded loop (training, Dar, the diffusion model) draws
its per-step randomness the same reproducible way."""

from __future__ import annotations

import numpy as np


def derived_seed(*parts: int) -> int:
    """A 32-bit seed determined by ``parts`` (e.g. run seed, epoch, step)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])
