"""One progress bar helper for every long loop: tqdm when asked for, a silent stand-in otherwise."""

from __future__ import annotations


class _Silent:
    """What :func:`progress_bar` returns when progress is off: accepts the same calls."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress_bar(total: int, description: str, unit: str = "it", enabled: bool = True):
    """A tqdm bar of ``total`` steps (``update(n)``, ``close()``), or a no-op when not ``enabled``."""
    if not enabled:
        return _Silent()
    from tqdm import tqdm

    return tqdm(total=int(total), desc=description, unit=unit, unit_scale=unit == "pair")


def progress_iter(items, description: str, unit: str = "it", enabled: bool = True, total: int | None = None):
    """``items`` wrapped in a tqdm bar when ``enabled``, else ``items`` itself (``total``: their
    count, for an iterator)."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=description, unit=unit, total=total)
