"""The main job: for every generated image, its nearest training images, scores and class.

``scan(train, synthetic)`` indexes both folders, embeds them with a DeepSSIM model (cached on
disk) or computes exact SSIM, finds the top-k training images of each generated image without
holding the full score matrix, classifies each generated image by its best score and
summarises the shares with 95% confidence intervals. ``ScanResult.save`` writes
``results.csv``, ``pairs.csv``, ``summary.json`` and ``report.html``.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepssim.embedding.model import DeepSSIM
from deepssim.errors import DeepSSIMError
from deepssim.hardware import resolve_precision
from deepssim.io.cache import EmbeddingCache, default_cache_path, image_fingerprints
from deepssim.io.files import write_text_atomic
from deepssim.io.load import ImageSet, LoadOptions
from deepssim.metrics import SimilarityMetric, load_metric
from deepssim.scanning.decide import (
    CLASS_NAMES,
    REFERENCE_PERCENTILE,
    Thresholds,
    classify,
    reference_threshold,
    share,
)
from deepssim.ssim.engine import ssim_pairs


@dataclass
class ScanResult:
    """Top-k training matches of every generated image, their classes and the summary.

    scores, neighbours: (M, k) best scores and indices into ``train_keys``, best first.
    classes: (M,) class of each generated image's best score (0 Different, 1 Duplicate, 2 Similar).
    verified_ssim: (M, k) exact SSIM of the same pairs when ``verify`` was asked for.
    best_per_training_image: (N,) each training image's best score over all generated images.
    reference_scores: each training image's best score against the held-out real images
    (Dar et al.'s reference distribution), when given.
    """

    metric: str
    model: str
    train: ImageSet
    synthetic: ImageSet
    scores: np.ndarray
    neighbours: np.ndarray
    thresholds: Thresholds
    classes: np.ndarray
    summary: dict
    verified_ssim: np.ndarray | None = None
    reference_scores: np.ndarray | None = None
    best_per_training_image: np.ndarray | None = None
    files: dict = field(default_factory=dict)

    @property
    def train_keys(self) -> list[str]:
        return self.train.keys

    @property
    def synthetic_keys(self) -> list[str]:
        return self.synthetic.keys

    def duplicates(self) -> list[tuple[str, str, float]]:
        """(generated key, training key, score) of every top-k pair above the high threshold."""
        rows, ranks = np.nonzero(self.scores > self.thresholds.high)
        return [
            (self.synthetic_keys[i], self.train_keys[self.neighbours[i, r]], float(self.scores[i, r]))
            for i, r in zip(rows, ranks, strict=True)
        ]

    def results_csv(self) -> str:
        """One row per generated image: its best match, score, class and the top-k."""
        k = self.scores.shape[1]
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        header = ["synthetic_key", "top1_train_key", "score", "class"]
        if self.verified_ssim is not None:
            header.append("top1_ssim")
        for rank in range(2, k + 1):
            header += [f"top{rank}_train_key", f"top{rank}_score"]
        writer.writerow(header)
        for i, key in enumerate(self.synthetic_keys):
            row = [key, self.train_keys[self.neighbours[i, 0]], f"{self.scores[i, 0]:.6f}"]
            row.append(CLASS_NAMES[int(self.classes[i])])
            if self.verified_ssim is not None:
                row.append(f"{self.verified_ssim[i, 0]:.6f}")
            for rank in range(1, k):
                row += [self.train_keys[self.neighbours[i, rank]], f"{self.scores[i, rank]:.6f}"]
            writer.writerow(row)
        return buffer.getvalue()

    def pairs_csv(self) -> str:
        """Every top-k pair: generated key, rank, training key, score, class (and SSIM)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        header = ["synthetic_key", "rank", "train_key", "score", "class"]
        writer.writerow(header + (["ssim"] if self.verified_ssim is not None else []))
        pair_classes = classify(self.scores, self.thresholds)
        for i, key in enumerate(self.synthetic_keys):
            for rank in range(self.scores.shape[1]):
                row = [
                    key,
                    rank + 1,
                    self.train_keys[self.neighbours[i, rank]],
                    f"{self.scores[i, rank]:.6f}",
                ]
                row.append(CLASS_NAMES[int(pair_classes[i, rank])])
                if self.verified_ssim is not None:
                    row.append(f"{self.verified_ssim[i, rank]:.6f}")
                writer.writerow(row)
        return buffer.getvalue()

    def save(self, out_dir: str | Path, report: bool = True, gallery_size: int = 24) -> dict:
        """Write results.csv, pairs.csv, summary.json and report.html, each atomically."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.files = {
            "results": out_dir / "results.csv",
            "pairs": out_dir / "pairs.csv",
            "summary": out_dir / "summary.json",
        }
        write_text_atomic(self.files["results"], self.results_csv())
        write_text_atomic(self.files["pairs"], self.pairs_csv())
        write_text_atomic(self.files["summary"], json.dumps(self.summary, indent=2) + "\n")
        if report:
            from deepssim.scanning.report import write_report

            self.files["report"] = out_dir / "report.html"
            write_report(self, self.files["report"], gallery_size)
        return self.files


def scan(
    train,
    synthetic,
    model: str | Path | DeepSSIM = "default",
    metric: str | SimilarityMetric = "deepssim",
    k: int = 5,
    thresholds: Thresholds | tuple[float | None, float | None] | None = None,
    reference=None,
    use_reference_threshold: bool = False,
    verify: bool = False,
    search: str = "exact",
    options: LoadOptions | None = None,
    cache: str | Path | None | bool = True,
    device: str = "cpu",
    batch_size: int = 64,
    precision: str = "auto",
    progress: bool = False,
) -> ScanResult:
    """Scan generated images against training images for memorised copies.

    train, synthetic, reference: folders, files or :class:`ImageSet`s.
    metric: "deepssim" (with ``model``), "ssim" (exact; one shared image size), an embedding
    baseline spec such as "sscd=FILE" (see :mod:`deepssim.metrics`), or a metric object.
    thresholds: default the metric's (paper: 0.6 / 0.85 for DeepSSIM and SSIM); a (low, high)
    tuple may leave either as None to take the metric's.
    reference: held-out real images of other patients. use_reference_threshold: replace the
    high threshold by the 95th percentile of each training image's best score against them
    (Dar et al.'s rule).
    cache: True for the default cache file, a path, or False/None for none.
    search: "exact" (blocked matrix products), "faiss" (exact index) or "faiss-hnsw" (approximate).
    """
    if k < 1:
        raise DeepSSIMError("k must be at least 1")
    if use_reference_threshold and reference is None:
        raise DeepSSIMError("the reference threshold needs reference images (--reference DIR)")
    started = time.perf_counter()
    precision = resolve_precision(precision, device)
    if not isinstance(metric, SimilarityMetric):
        metric = load_metric(metric, device, default_model=model)
    thresholds = resolve_thresholds(thresholds, metric, use_reference_threshold)
    train_set = ImageSet.coerce(train, options, progress, "indexing training images")
    synthetic_set = ImageSet.coerce(synthetic, options, progress, "indexing generated images")
    reference_set = (
        ImageSet.coerce(reference, options, progress, "indexing reference images") if reference else None
    )
    store = _open_cache(cache, metric, precision) if metric.is_embedding else None
    embed = _embedder(metric, store, batch_size, precision, progress) if metric.is_embedding else None
    try:
        scores, neighbours, best_per_train = metric.top_k(
            train_set, synthetic_set, k, search=search, embed=embed, progress=progress
        )
        reference_scores = None
        if reference_set is not None:  # each training image's best score against other patients
            reference_scores = metric.top_k(
                train_set, reference_set, 1, search=search, embed=embed, progress=progress
            )[2]
    finally:
        if store is not None:
            store.close()
    model_name = getattr(metric, "source", metric.description)
    if use_reference_threshold:
        high = reference_threshold(reference_scores)
        low = high if thresholds is None else min(thresholds.low, high)
        thresholds = Thresholds(low, high, f"reference p{REFERENCE_PERCENTILE:g}")
    verified = verify_pairs(train_set, synthetic_set, neighbours) if verify else None
    classes = classify(scores[:, 0], thresholds)
    summary = summarise(
        metric.name,
        model_name,
        train_set,
        synthetic_set,
        scores,
        best_per_train,
        thresholds,
        reference_scores,
        search,
    )
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return ScanResult(
        metric=metric.name,
        model=model_name,
        train=train_set,
        synthetic=synthetic_set,
        scores=scores,
        neighbours=neighbours,
        thresholds=thresholds,
        classes=classes,
        summary=summary,
        verified_ssim=verified,
        reference_scores=reference_scores,
        best_per_training_image=best_per_train,
    )


def resolve_thresholds(given, metric: SimilarityMetric, use_reference_threshold: bool) -> Thresholds | None:
    """Thresholds from what the user gave, the rest from the metric's published ones."""
    if isinstance(given, Thresholds):
        return given
    low, high = given if given is not None else (None, None)
    defaults = metric.thresholds
    if defaults is None and (low is None or (high is None and not use_reference_threshold)):
        raise DeepSSIMError(
            f"{metric.name} has no published thresholds: pass --low and --high, "
            "or --thresholds from `deepssim calibrate`"
        )
    if defaults is not None:
        low = defaults[0] if low is None else low
        high = defaults[1] if high is None else high
    if high is None:  # only the reference rule will set it
        return None
    source = "paper" if given is None or given == (None, None) else "set"
    return Thresholds(low, high, source)


def summarise(
    metric, model_name, train_set, synthetic_set, scores, best_per_train, thresholds, reference_scores, search
):
    """The numbers a paper needs: class shares with 95% Wilson intervals, memorised training
    images (those whose best score over all generated images is a Duplicate), the score
    distribution and the reference distribution."""
    m, n = len(synthetic_set), len(train_set)
    classes = classify(scores[:, 0], thresholds)
    memorised = np.flatnonzero(best_per_train > thresholds.high)
    best = scores[:, 0]
    percentiles = [0, 5, 25, 50, 75, 95, 100]
    summary = {
        "metric": metric,
        "model": model_name,
        "training_images": n,
        "generated_images": m,
        "k": int(scores.shape[1]),
        "search": "exact SSIM, blocked" if metric == "ssim" else search,
        "thresholds": {"low": thresholds.low, "high": thresholds.high, "source": thresholds.source},
        "generated_by_class": {CLASS_NAMES[c]: share(int((classes == c).sum()), m) for c in (1, 2, 0)},
        "training_images_with_a_duplicate": share(len(memorised), n),
        "best_score_percentiles": {f"p{p}": float(np.percentile(best, p)) for p in percentiles},
        "skipped_images": {"training": len(train_set.skipped), "generated": len(synthetic_set.skipped)},
    }
    if reference_scores is not None:
        summary["reference"] = {
            "description": "each training image's best score against the held-out real images",
            "training_images": int(len(reference_scores)),
            "best_score_percentiles": {
                f"p{p}": float(np.percentile(reference_scores, p)) for p in percentiles
            },
            f"p{REFERENCE_PERCENTILE:g}_threshold": reference_threshold(reference_scores),
        }
    return summary


def verify_pairs(train_set: ImageSet, synthetic_set: ImageSet, neighbours: np.ndarray, block: int = 512):
    """Exact SSIM of every top-k pair (training image as the "real" side)."""
    if train_set.shape != synthetic_set.shape:
        raise DeepSSIMError(
            f"--verify needs one image size: training images are {train_set.shape}, generated "
            f"{synthetic_set.shape}; pass --size HxW"
        )
    out = np.empty(neighbours.shape, dtype=np.float32)
    for start in range(0, len(synthetic_set), block):
        generated = synthetic_set.read(start, start + block)
        rows = neighbours[start : start + len(generated)]
        needed = np.unique(rows)
        train_images = dict(zip(needed.tolist(), train_set.take(needed), strict=True))
        real = np.stack([train_images[i] for i in rows.ravel()])
        fake = np.repeat(generated, rows.shape[1], axis=0)
        out[start : start + len(generated)] = ssim_pairs(real, fake).reshape(rows.shape)
    return out


def _open_cache(cache, metric: SimilarityMetric, precision: str) -> EmbeddingCache | None:
    if cache is None or cache is False:
        return None
    path = default_cache_path() if cache is True else Path(cache)
    return EmbeddingCache(path, f"{metric.fingerprint}:{precision}")


def _embedder(metric: SimilarityMetric, store: EmbeddingCache | None, batch_size, precision, progress):
    """A function embedding an ImageSet, taking what the cache has and storing the rest."""
    chunk = batch_size * 8
    done: dict[int, np.ndarray] = {}  # the training set is embedded once, also for --reference

    def embed(images: ImageSet, role: str) -> np.ndarray:
        if id(images) in done:
            return done[id(images)]
        fingerprints = image_fingerprints(images) if store is not None else None
        found = store.get(fingerprints) if store is not None else {}
        missing = [i for i in range(len(images)) if fingerprints is None or fingerprints[i] not in found]
        out = None
        if found:
            out = np.empty((len(images), len(next(iter(found.values())))), dtype=np.float32)
            for i, fingerprint in enumerate(fingerprints):
                if fingerprint in found:
                    out[i] = found[fingerprint]
        bar = None
        if progress and missing:
            from tqdm import tqdm

            bar = tqdm(total=len(missing), desc=f"embedding {role} images", unit="img")
        for start in range(0, len(missing), chunk):
            rows = missing[start : start + chunk]
            vectors = metric.embed(images.take(rows), batch_size, precision)
            if out is None:
                out = np.empty((len(images), vectors.shape[1]), dtype=np.float32)
            out[rows] = vectors
            if store is not None:
                store.put([fingerprints[i] for i in rows], vectors)
            if bar is not None:
                bar.update(len(rows))
        if bar is not None:
            bar.close()
        done[id(images)] = out
        return out

    return embed
