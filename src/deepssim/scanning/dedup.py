"""Find near-duplicate images within one training set, with the scan's decision.

Duplicating training images is what makes a generator copy them (Carlini et al. 2023,
Somepalli et al. 2023); deduplicating the training set is the standard cure. The decision is
the scan's two-stage one applied to the training set against itself: DeepSSIM retrieves each
image's ``k`` most similar *other* training images, the registered SSIM of each pair (exact SSIM
after the best flip, rotation, shift and scale) decides, and a pair above the high threshold
(default: registered SSIM's Duplicate threshold for the images' size, as in the scan) links the
two images. Linked images form groups
(union-find, so a chain of duplicates is one group); each group keeps one representative, the
first of its images in the set's order (sorted keys for a folder). Files are never moved or
deleted: the result is two lists.

    result = deduplicate("train_dir", out_dir="dedup")
    result.kept  # keys of the images to train on

Writes into ``out_dir``: ``groups.csv`` (one row per image of a group with more than one image:
``group, key, path, representative, partner, ssim_registered``, where partner is the image it
was linked to with the highest registered SSIM) and ``kept.txt`` (one key per line: every image
outside a group and each group's representative). Both are written atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.execution.search import top_k_other_groups
from deepssim.io.files import write_rows_atomic, write_text_atomic
from deepssim.io.load import ImageSet, LoadOptions
from deepssim.scanning.decide import REGISTERED_SSIM, check_threshold_values, default_thresholds
from deepssim.ssim.registered import register_pairs


@dataclass
class DedupResult:
    """keys: every training image, in the set's order. groups: lists of indices into ``keys``
    (groups of two or more images, each sorted, representative first). kept: the keys to keep.
    pairs: (i, j, registered SSIM) of every linking pair, i < j."""

    keys: list[str]
    groups: list[list[int]]
    kept: list[str]
    pairs: list[tuple[int, int, float]]
    threshold: float
    files: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def removed(self) -> int:
        return len(self.keys) - len(self.kept)


def deduplicate(
    train,
    *,
    out_dir: str | Path | None,
    model="default",
    k: int = 5,
    threshold: float | None = None,
    options: LoadOptions | None = None,
    batch_size: int = 64,
    precision: str = "float32",
    device: str = "cpu",
    block: int = 256,
    progress: bool = False,
) -> DedupResult:
    """Group the near-duplicates of one training set and keep one image per group.

    train: a folder, files or an :class:`ImageSet` (one image size; use ``options.size`` to
    resize). model: the DeepSSIM model that retrieves ("default", a checkpoint, a TorchScript
    file or a :class:`DeepSSIMMetric`). k: candidates retrieved per image (each is registered).
    threshold: registered SSIM above which two images are duplicates. device: where the model
    embeds ("cpu" or "cuda"; registration runs on the CPU). out_dir: where
    ``groups.csv`` and ``kept.txt`` go (None: write nothing).
    """
    from deepssim.metrics.deepssim_metric import DeepSSIMMetric

    if k < 1:
        raise DeepSSIMError("k must be at least 1")
    started = time.perf_counter()
    image_set = ImageSet.coerce(train, options, progress, "indexing training images")
    n = len(image_set)
    if n < 2:
        raise DeepSSIMError("deduplication needs at least two training images")
    metric = model if isinstance(model, DeepSSIMMetric) else DeepSSIMMetric(model, device)
    vectors = np.concatenate(
        [
            metric.embed(image_set.read(s, s + 1024), batch_size=batch_size, precision=precision)
            for s in range(0, n, 1024)
        ]
    )
    # each image its own group: every image's k most similar *other* images
    _, neighbours = top_k_other_groups(vectors, [str(i) for i in range(n)], min(k, n - 1))
    if threshold is None:
        threshold = default_thresholds(REGISTERED_SSIM, image_set.shape, None).high
    check_threshold_values(None, threshold)
    pairs = _linked_pairs(image_set, neighbours, threshold, block)
    groups = _union_find_groups(n, [(i, j) for i, j, _ in pairs])
    in_group = {i for members in groups for i in members}
    keep = sorted([i for i in range(n) if i not in in_group] + [members[0] for members in groups])
    keys = image_set.keys
    result = DedupResult(
        keys=keys,
        groups=groups,
        kept=[keys[i] for i in keep],
        pairs=pairs,
        threshold=threshold,
        seconds=round(time.perf_counter() - started, 2),
    )
    if out_dir is not None:
        result.files = _write(result, image_set, Path(out_dir))
    return result


def _linked_pairs(image_set: ImageSet, neighbours: np.ndarray, threshold: float, block: int):
    """Registered SSIM of each retrieved pair (each unordered pair once); the pairs above ``threshold``.

    The generated side of the registration is the later image of the pair, the training side the
    earlier one, so each pair is registered one way only."""
    n, k = neighbours.shape
    first = np.repeat(np.arange(n), k)
    second = neighbours.ravel()
    low, high = np.minimum(first, second), np.maximum(first, second)
    unique = np.unique(np.stack([low, high], axis=1), axis=0)
    linked = []
    for start in range(0, len(unique), block):
        chunk = unique[start : start + block]
        needed = np.unique(chunk)
        images = dict(zip(needed.tolist(), image_set.take(needed), strict=True))
        scores = register_pairs(
            np.stack([images[i] for i in chunk[:, 0]]), np.stack([images[j] for j in chunk[:, 1]])
        ).ssim_registered
        linked += [
            (int(i), int(j), float(s)) for (i, j), s in zip(chunk, scores, strict=True) if s > threshold
        ]
    return linked


def _union_find_groups(n: int, edges: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components with more than one member, each sorted, ordered by first member."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in edges:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(i)
    return sorted((m for m in members.values() if len(m) > 1), key=lambda m: m[0])


def _write(result: DedupResult, image_set: ImageSet, out_dir: Path) -> dict:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DeepSSIMError(f"{out_dir}: cannot create the output folder ({error.strerror})") from None
    best: dict[int, tuple[int, float]] = {}
    for i, j, score in result.pairs:
        for a, b in ((i, j), (j, i)):
            if a not in best or score > best[a][1]:
                best[a] = (b, score)
    rows = []
    for number, members in enumerate(result.groups):
        for i in members:
            partner, score = best[i]
            ref = image_set.refs[i]
            rows.append(
                {
                    "group": number,
                    "key": result.keys[i],
                    "path": str(ref.path) + ("" if ref.index is None else f"#{ref.index}"),
                    "representative": int(i == members[0]),
                    "partner": result.keys[partner],
                    "ssim_registered": f"{score:.4f}",
                }
            )
    fields = ["group", "key", "path", "representative", "partner", "ssim_registered"]
    write_rows_atomic(out_dir / "groups.csv", rows, fields)
    write_text_atomic(out_dir / "kept.txt", "".join(f"{key}\n" for key in result.kept))
    return {"groups": str(out_dir / "groups.csv"), "kept": str(out_dir / "kept.txt")}
