"""Images for people: 8-bit gray, false colour and PNG bytes (the report and the labelling page)."""

from __future__ import annotations

import io

import numpy as np


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Gray levels 0-255 between the image's 0.5th and 99.5th percentiles (robust to outliers)."""
    low, high = np.percentile(image, [0.5, 99.5])
    return np.clip((image - low) / max(high - low, 1e-12) * 255, 0, 255).astype(np.uint8)


def colour(values: np.ndarray, colormap: str, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """An (H, W, 3) uint8 rendering of a map with a matplotlib colormap, between ``value_range``
    or (None) the map's own 0.5th and 99.5th percentiles."""
    from matplotlib import colormaps

    low, high = value_range if value_range is not None else np.percentile(values, [0.5, 99.5])
    scaled = np.clip((values - low) / max(high - low, 1e-12), 0, 1)
    return (colormaps[colormap](scaled)[..., :3] * 255).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
