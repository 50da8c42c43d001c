"""The main job: for every generated image, its nearest training images, scores and class.

``scan(train, generated)`` indexes both folders, embeds them with a DeepSSIM model (cached on
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from deepssim.embedding.model import DeepSSIM
from deepssim.errors import DeepSSIMError
from deepssim.hardware import resolve_precision
from deepssim.io.files import write_rows_atomic, write_text_atomic
from deepssim.io.load import ImageSet, LoadOptions
from deepssim.metrics import SimilarityMetric, load_metric
from deepssim.scanning.audit import audit_trail
from deepssim.scanning.decide import (
    CLASS_NAMES,
    REFERENCE_PERCENTILE,
    Thresholds,
    classify,
    conformal_threshold,
    reference_threshold,
    share,
)
from deepssim.scanning.engines import ScanEngine, get_engine
from deepssim.scanning.groups import group_of_each_image, group_summary
from deepssim.scanning.search import top_k_other_groups
from deepssim.scanning.settings import ScanSettings
from deepssim.ssim.registered import Registration, register_pairs


@dataclass
class ScanResult:
    """Top-k training matches of every generated image, their classes and the summary.

    scores, neighbours: (M, k) the metric's scores and indices into ``train_keys``. With the
    two-stage decision each row is ordered by registered SSIM, best first; else by score.
    evidence: registered and plain SSIM and the transform of the top-k pairs (every pair in the
    two-stage decision or with ``verify``; else the Duplicates only, NaN elsewhere).
    decision_scores: what the classes come from: registered SSIM (two-stage) or the score.
    classes: (M,) class of each generated image's best pair (0 Different, 1 Duplicate, 2 Similar).
    best_per_training_image: (N,) each training image's best score over all generated images.
    reference_scores: each training image's best score against the held-out real images
    (Dar et al.'s reference distribution), when given.
    """

    metric: str
    model: str
    train: ImageSet
    generated: ImageSet
    scores: np.ndarray
    neighbours: np.ndarray
    thresholds: Thresholds
    classes: np.ndarray
    summary: dict
    evidence: Registration | None = None
    decision: str = "score"
    embedder: DeepSSIM | None = None
    groups: list[dict] | None = None
    reference_scores: np.ndarray | None = None
    best_per_training_image: np.ndarray | None = None
    files: dict = field(default_factory=dict)

    @property
    def decision_scores(self) -> np.ndarray:
        return self.evidence.ssim_registered if self.decision == "two-stage" else self.scores

    @property
    def train_keys(self) -> list[str]:
        return self.train.keys

    @property
    def generated_keys(self) -> list[str]:
        return self.generated.keys

    def duplicates(self) -> list[tuple[str, str, float]]:
        """(generated key, training key, decision score) of every top-k pair above the high threshold."""
        decided = self.decision_scores
        rows, ranks = np.nonzero(decided > self.thresholds.high)
        return [
            (self.generated_keys[i], self.train_keys[self.neighbours[i, r]], float(decided[i, r]))
            for i, r in zip(rows, ranks, strict=True)
        ]

    def results_csv(self) -> str:
        """One row per generated image: its best match, score, class, the evidence and the top-k."""
        k = self.scores.shape[1]
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        header = ["generated_key", "top1_train_key", "score", "class"]
        if self.evidence is not None:
            header += ["top1_ssim_registered", "top1_transform", "top1_ssim"]
        for rank in range(2, k + 1):
            header += [f"top{rank}_train_key", f"top{rank}_score"]
        writer.writerow(header)
        for i, key in enumerate(self.generated_keys):
            row = [key, self.train_keys[self.neighbours[i, 0]], f"{self.scores[i, 0]:.6f}"]
            row.append(CLASS_NAMES[int(self.classes[i])])
            if self.evidence is not None:
                row += self.evidence.cells(i, 0)
            for rank in range(1, k):
                row += [self.train_keys[self.neighbours[i, rank]], f"{self.scores[i, rank]:.6f}"]
            writer.writerow(row)
        return buffer.getvalue()

    def pairs_csv(self) -> str:
        """Every top-k pair: generated key, rank, training key, score, class (and the evidence)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        header = ["generated_key", "rank", "train_key", "score", "class"]
        writer.writerow(
            header + (["ssim_registered", "transform", "ssim"] if self.evidence is not None else [])
        )
        pair_classes = classify(np.nan_to_num(self.decision_scores, nan=-np.inf), self.thresholds)
        for i, key in enumerate(self.generated_keys):
            for rank in range(self.scores.shape[1]):
                row = [
                    key,
                    rank + 1,
                    self.train_keys[self.neighbours[i, rank]],
                    f"{self.scores[i, rank]:.6f}",
                ]
                row.append(CLASS_NAMES[int(pair_classes[i, rank])])
                if self.evidence is not None:
                    row += self.evidence.cells(i, rank)
                writer.writerow(row)
        return buffer.getvalue()

    def save(
        self, out_dir: str | Path, report: bool = True, gallery_size: int = 24, anonymise: bool = False
    ) -> dict:
        """Write results.csv, pairs.csv, summary.json and report.html, each atomically.
        anonymise: the report holds no image of anyone, only keys, scores and maps of differences."""
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
        if self.groups is not None:
            self.files["groups"] = out_dir / "groups.csv"
            write_rows_atomic(
                self.files["groups"], self.groups, ["group", "training_images", "images_with_a_duplicate"]
            )
        if report:
            from deepssim.scanning.report import write_report

            self.files["report"] = out_dir / "report.html"
            write_report(self, self.files["report"], gallery_size, anonymise)
        return self.files


def scan(
    train,
    generated,
    *,
    model: str | Path | DeepSSIM = "default",
    metric: str | SimilarityMetric = "deepssim",
    decision: str = "two-stage",
    k: int = 5,
    thresholds: Thresholds | tuple[float | None, float | None] | None = None,
    reference=None,
    use_reference_threshold: bool = False,
    verify: bool = False,
    group_by: str | None = None,
    duplicate_fpr: float | None = None,
    search: str = "exact",
    options: LoadOptions | None = None,
    cache: str | Path | None | bool = True,
    device: str = "cpu",
    batch_size: int = 64,
    precision: str = "auto",
    engine: str | ScanEngine = "local",
    progress: bool = False,
) -> ScanResult:
    """Scan generated images against training images for memorised copies.

    train, generated, reference: folders, files or :class:`ImageSet`s.
    metric: "deepssim" (with ``model``), "ssim" (exact; one shared image size), an embedding
    baseline spec such as "sscd=FILE" (see :mod:`deepssim.metrics`), or a metric object.
    decision: "two-stage" (default): the metric retrieves each generated image's top-k training
    images and the registered SSIM of those pairs (SSIM after the best flip, rotation, shift and
    scale) decides, with SSIM's thresholds; "score": the metric's own score decides (faster).
    thresholds: default the decision score's published ones (0.6 / 0.85 for SSIM and DeepSSIM);
    a (low, high) tuple may leave either as None to take the default.
    reference: held-out real images of other patients. use_reference_threshold: replace the
    high threshold by the 95th percentile of each training image's best score against them
    (Dar et al.'s rule).
    verify: with the score decision, also compute registered and plain SSIM of every top-k pair
    (they are always computed for the pairs called Duplicate).
    group_by: "volume", "folder" or a regex taking the patient ID from each training key
    (:mod:`deepssim.scanning.groups`): the summary then counts patients with a Duplicate.
    duplicate_fpr: set the high threshold without labels so that at most this share of
    different-patient matches are called Duplicate (a conformal threshold from each training
    image's best score against the other groups' training images; needs ``group_by``). A
    reference threshold, when asked for, takes precedence.
    cache: True for the default cache file, a path, or False/None for none.
    search: "exact" (blocked matrix products), "faiss" (exact index) or "faiss-hnsw" (approximate).
    engine: where embedding, search and registration run: "local" (this process) or "ray" (a Ray
    cluster; pass a :class:`deepssim.scanning.ray_engine.RayEngine` for its options). The
    decisions and outputs are the same either way.
    """
    settings = ScanSettings(
        decision=decision,
        k=k,
        use_reference_threshold=use_reference_threshold,
        verify=verify,
        group_by=group_by,
        duplicate_fpr=duplicate_fpr,
        search=search,
        batch_size=batch_size,
        precision=precision,
        device=device,
        engine=engine if isinstance(engine, str) else engine.name,
    )
    if use_reference_threshold and reference is None:
        raise DeepSSIMError("the reference threshold needs reference images (--reference DIR)")
    started = time.perf_counter()
    precision = resolve_precision(precision, device)
    if not isinstance(metric, SimilarityMetric):
        metric = load_metric(metric, device, default_model=model)
    two_stage = decision == "two-stage"
    thresholds = resolve_thresholds(
        thresholds, load_metric("ssim") if two_stage else metric, use_reference_threshold
    )
    stages: dict[str, float] = {}  # seconds per stage, for summary.json and the benchmarks
    lap = _stopwatch(stages)
    train_set = ImageSet.coerce(train, options, progress, "indexing training images")
    generated_set = ImageSet.coerce(generated, options, progress, "indexing generated images")
    reference_set = (
        ImageSet.coerce(reference, options, progress, "indexing reference images") if reference else None
    )
    lap("index")
    if two_stage or verify:
        _check_one_size(train_set, generated_set, "--decision score" if two_stage else "no --verify")
    engine = get_engine(engine)
    embed = None
    if metric.is_embedding:
        embed = engine.embedder(
            metric, cache=cache, batch_size=batch_size, precision=precision, progress=progress
        )
    try:
        if embed is not None:
            embed.prepare({"training": train_set, "generated": generated_set})
            lap("embed")
        scores, neighbours, best_per_train = metric.top_k(
            train_set, generated_set, k, search=search, embed=embed, engine=engine, progress=progress
        )
        lap("search")
        reference_scores = None
        if reference_set is not None and two_stage:  # registered SSIM against the nearest other patients
            _, nearest, _ = metric.top_k(
                reference_set, train_set, k, search=search, embed=embed, engine=engine, progress=progress
            )
            reference_scores = np.nanmax(
                register_top_k(
                    reference_set, train_set, nearest, progress=progress, engine=engine
                ).ssim_registered,
                axis=1,
            )
        elif reference_set is not None:  # each training image's best score against other patients
            reference_scores = metric.top_k(
                train_set, reference_set, 1, search=search, embed=embed, engine=engine, progress=progress
            )[2]
        groups = group_of_each_image(train_set, group_by) if group_by else None
        null_scores = None
        if duplicate_fpr is not None:
            null_scores = _different_patient_scores(
                metric, train_set, groups, k, two_stage, embed, engine, progress
            )
        lap("references")
    finally:
        if hasattr(embed, "close"):
            embed.close()
    model_name = getattr(metric, "source", metric.description)
    if duplicate_fpr is not None and not use_reference_threshold:
        high = conformal_threshold(null_scores, duplicate_fpr)
        low = min(thresholds.low, high) if thresholds is not None else high
        thresholds = Thresholds(low, high, f"fpr {duplicate_fpr:g} from {len(set(groups))} training groups")
    if use_reference_threshold:
        high = reference_threshold(reference_scores)
        low = high if thresholds is None else min(thresholds.low, high)
        thresholds = Thresholds(low, high, f"reference p{REFERENCE_PERCENTILE:g}")
    if two_stage or verify:
        evidence = register_top_k(train_set, generated_set, neighbours, progress=progress, engine=engine)
    else:  # the evidence of every Duplicate, always
        evidence = register_top_k(
            train_set, generated_set, neighbours, scores > thresholds.high, progress, engine=engine
        )
    lap("register")
    if two_stage:
        order = np.argsort(-evidence.ssim_registered, axis=1, kind="stable")
        scores = np.take_along_axis(scores, order, axis=1)
        neighbours = np.take_along_axis(neighbours, order, axis=1)
        evidence = evidence.reordered(order)
        best_per_train = np.full(len(train_set), -np.inf, dtype=np.float64)
        np.maximum.at(best_per_train, neighbours.ravel(), evidence.ssim_registered.ravel())
    decided = evidence.ssim_registered if two_stage else scores
    classes = classify(decided[:, 0], thresholds)
    summary = summarise(
        metric.name,
        model_name,
        train_set,
        generated_set,
        decided,
        best_per_train,
        thresholds,
        reference_scores,
        search,
    )
    summary["decision"] = (
        f"two-stage: {metric.name} retrieves the top {scores.shape[1]}, registered SSIM decides"
        if two_stage
        else f"score: {metric.name} decides"
    )
    summary["precision"] = precision
    group_rows = None
    if groups is not None:
        with_duplicate, group_rows = group_summary(groups, best_per_train > thresholds.high)
        summary["groups"] = {"by": group_by, "groups": len(group_rows), "with_a_duplicate": with_duplicate}
    if null_scores is not None:
        summary["different_patient_scores"] = {
            "description": "each training image's best score against the training images of other groups",
            "training_images": int(len(null_scores)),
            "best_score_percentiles": {f"p{p}": float(np.percentile(null_scores, p)) for p in (50, 95, 99)},
            "requested_fpr": duplicate_fpr,
        }
    inputs = {"training": train_set, "generated": generated_set}
    if reference_set is not None:
        inputs["reference"] = reference_set
    summary["audit"] = audit_trail(
        inputs,
        {"training": train, "generated": generated, "reference": reference},
        {
            "metric": metric.name,
            "name": model_name,
            "fingerprint_sha256": metric.fingerprint.split(":")[-1],
            "validation": _model_validation(metric),
        },
        {
            **asdict(settings),
            "engine": engine.describe(),
            "precision": precision,
            "thresholds": {"low": thresholds.low, "high": thresholds.high, "source": thresholds.source},
            "loading": asdict(train_set.options),
        },
    )
    lap("decide")
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary["seconds_by_stage"] = {name: round(value, 2) for name, value in stages.items() if value > 0}
    return ScanResult(
        metric=metric.name,
        model=model_name,
        train=train_set,
        generated=generated_set,
        scores=scores,
        neighbours=neighbours,
        thresholds=thresholds,
        classes=classes,
        summary=summary,
        evidence=evidence,
        decision=decision,
        embedder=getattr(metric, "model", None),
        groups=group_rows,
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
    metric, model_name, train_set, generated_set, scores, best_per_train, thresholds, reference_scores, search
):
    """The numbers a paper needs: class shares with 95% Wilson intervals, memorised training
    images (those whose best score over all generated images is a Duplicate), the score
    distribution and the reference distribution."""
    m, n = len(generated_set), len(train_set)
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
        "skipped_images": {"training": len(train_set.skipped), "generated": len(generated_set.skipped)},
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


def _stopwatch(stages: dict[str, float]):
    """``lap(name)`` adds the seconds since the previous lap to ``stages[name]``."""
    last = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        stages[name] = stages.get(name, 0.0) + now - last[0]
        last[0] = now

    return lap


def register_top_k(
    train_set: ImageSet,
    generated_set: ImageSet,
    neighbours: np.ndarray,
    selected=None,
    progress=False,
    block=256,
    engine: str | ScanEngine = "local",
) -> Registration:
    """Registered SSIM of the (training image, generated image) pairs ``neighbours`` names, for
    the pairs ``selected`` (an (M, k) mask; default all), one block of generated images per task
    of the ``engine``."""
    engine = get_engine(engine)
    selected = np.ones(neighbours.shape, dtype=bool) if selected is None else np.asarray(selected)
    starts = [start for start in range(0, len(neighbours), block) if selected[start : start + block].any()]
    found = engine.map(
        _register_block,
        [(train_set, generated_set, neighbours[s : s + block], selected[s : s + block], s) for s in starts],
        sizes=[int(selected[s : s + block].sum()) for s in starts],
        description="registering top-k pairs",
        progress=progress,
    )
    evidence = Registration.empty(neighbours.shape)
    for rows, rank, result in found:
        for name in ("ssim_registered", "ssim_plain", "flip", "rotation_deg", "shift_px", "scale", "gamma"):
            getattr(evidence, name)[rows, rank] = getattr(result, name)
    return evidence


def _register_block(train_set: ImageSet, generated_set: ImageSet, neighbours, selected, start: int):
    """One task: register the selected pairs of generated images ``start:start + len(neighbours)``."""
    chosen, rank = np.nonzero(selected)
    generated = generated_set.read(start, start + len(neighbours))
    train_rows = neighbours[chosen, rank]
    needed = np.unique(train_rows)
    train_images = dict(zip(needed.tolist(), train_set.take(needed), strict=True))
    result = register_pairs(np.stack([train_images[i] for i in train_rows]), generated[chosen])
    return start + chosen, rank, result


def _different_patient_scores(metric, train_set, groups, k, two_stage, embed, engine, progress) -> np.ndarray:
    """Each training image's best decision score against the training images of other groups."""
    if not metric.is_embedding:
        raise DeepSSIMError(
            "--duplicate-fpr retrieves with an embedding metric; use --metric deepssim (the default)"
        )
    scores, nearest = top_k_other_groups(embed(train_set, "training"), groups, k)
    if not two_stage:
        return scores[:, 0].astype(np.float64)
    evidence = register_top_k(train_set, train_set, nearest, progress=progress, engine=engine)
    return np.nanmax(evidence.ssim_registered, axis=1)


def _model_validation(metric) -> dict | None:
    """The validation numbers a DeepSSIM checkpoint was selected by, as its card records them."""
    model = getattr(metric, "model", None)
    training = model.config.get("training") if model is not None else None
    return training.get("best_validation") if isinstance(training, dict) else None


def _check_one_size(train_set: ImageSet, generated_set: ImageSet, alternative: str) -> None:
    if train_set.shape != generated_set.shape:
        raise DeepSSIMError(
            f"registered SSIM needs one image size: training images are {train_set.shape}, generated "
            f"{generated_set.shape}; pass --size HxW (or use {alternative})"
        )
