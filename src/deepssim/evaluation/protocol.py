"""The paper's evaluation protocol on labelled pairs, and threshold calibration.

A labelled pairs CSV has ``train_key, generated_key, label`` (0 Different, 1 Duplicate, 2 Similar)
and optionally ``split``. For each metric and setting (aligned: images as they are;
misaligned: each image of a pair augmented independently with flips along both axes, rotation
uniform in +-0.1745 rad and gamma 0.5-1.5, each with probability 0.8, seeded, the same views for
every metric), and for each source of thresholds (the paper's, and thresholds calibrated for
macro-F1 on a separate split), it reports per-class precision and recall, macro-F1, weighted
F1, the silhouette score of the 1-d scores against the labels, and TPR at 5% FPR and AUROC for
Duplicate-vs-rest, each with a bootstrap 95% confidence interval. All numbers come from
scikit-learn.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from deepssim.errors import DeepSSIMError
from deepssim.io.files import atomic_path, write_rows_atomic, write_text_atomic
from deepssim.io.load import ImageSet, LoadOptions
from deepssim.labels import Label
from deepssim.metrics import SimilarityMetric, load_metric
from deepssim.scanning.decide import (
    REGISTERED_SSIM,
    Thresholds,
    calibrate,
    calibration_intervals,
    classify,
)
from deepssim.settings import check_literal_fields, choices, option
from deepssim.training.pairs import read_pair_csv

SETTINGS = ("aligned", "misaligned")
FPR_AT = 0.05


@dataclass
class LabelledPairs:
    """The images of every listed pair (train[i], generated[i]), its label and split."""

    train: np.ndarray
    generated: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    rows: list[dict]


def read_labelled_pairs(
    pairs_csv, train, generated, options: LoadOptions | None = None, progress=False, need_labels: bool = True
) -> LabelledPairs:

    rows = read_pair_csv(pairs_csv)
    if need_labels and "label" not in rows[0]:
        raise DeepSSIMError(f"{pairs_csv}: a labelled pairs file needs a 'label' column (0, 1 or 2)")
    train_set = ImageSet.coerce(train, options, progress, "indexing training images")
    generated_set = ImageSet.coerce(generated, options, progress, "indexing generated images")
    if train_set.shape != generated_set.shape:
        raise DeepSSIMError(
            f"training images are {train_set.shape} but generated images are {generated_set.shape}; "
            "pass --size HxW"
        )
    index = {
        "train_key": {k: i for i, k in enumerate(train_set.keys)},
        "generated_key": {k: i for i, k in enumerate(generated_set.keys)},
    }
    first, second, labels = [], [], []
    for line, row in enumerate(rows, start=2):
        for column in ("train_key", "generated_key"):
            if row[column] not in index[column]:
                raise DeepSSIMError(
                    f"{pairs_csv}:{line}: {column} {row[column]!r} is not among the images given"
                )
        first.append(index["train_key"][row["train_key"]])
        second.append(index["generated_key"][row["generated_key"]])
        if need_labels:
            try:
                labels.append(int(Label.parse(row["label"])))
            except DeepSSIMError as error:
                raise DeepSSIMError(f"{pairs_csv}:{line}: {error}") from None
    splits = np.array([row.get("split") or "" for row in rows])
    return LabelledPairs(train_set.take(first), generated_set.take(second), np.array(labels), splits, rows)


def misaligned_views(images: np.ndarray, seed: int) -> np.ndarray:
    """The protocol's independently augmented view of every image, seeded."""
    from deepssim.training.augment import augment_batch

    batch = torch.from_numpy(np.asarray(images, dtype=np.float32)).unsqueeze(1)
    return augment_batch(batch, "misaligned", seed)[:, 0].double().numpy()


# Below this many labelled pairs in a class, its thresholds are little more than a guess.
MIN_PAIRS_PER_CLASS = 20


@dataclass
class Calibration:
    """Thresholds fitted on labelled pairs, with what they rest on."""

    thresholds: Thresholds
    macro_f1: float
    pairs_by_class: dict[str, int]
    intervals: dict  # 95% bootstrap intervals of low and high

    @property
    def pairs(self) -> int:
        return sum(self.pairs_by_class.values())


def calibrate_thresholds(
    pairs_csv,
    train,
    generated,
    metric="registered",
    model="default",
    options=None,
    device="cpu",
    progress=False,
    out=None,
    bootstrap: int = 200,
    seed: int = 0,
) -> Calibration:
    """Thresholds maximising macro-F1 on labelled pairs (aligned), for the score ``metric`` gives:
    ``registered`` (registered SSIM, what the default two-stage scan decides with), or any metric
    (for ``scan --decision score --metric ...``). The thresholds record that score, the image size
    and the model's fingerprint, so a scan refuses them for another score; saved to ``out``.

    Warns when a class has fewer than :data:`MIN_PAIRS_PER_CLASS` labelled pairs.
    """
    metric = metric if isinstance(metric, SimilarityMetric) else load_metric(metric, device, model)
    pairs = read_labelled_pairs(pairs_csv, train, generated, options, progress)
    counts = {label.title: int((pairs.labels == label).sum()) for label in Label}
    thin = [f"{name} {count}" for name, count in counts.items() if count < MIN_PAIRS_PER_CLASS]
    if thin:
        warnings.warn(
            f"few labelled pairs per class ({', '.join(thin)}; at least {MIN_PAIRS_PER_CLASS} each is "
            "advised): these thresholds are uncertain; see their bootstrap intervals",
            stacklevel=2,
        )
    scores = metric.pair_scores(pairs.train, pairs.generated)
    found, f1 = calibrate(scores, pairs.labels)
    score = REGISTERED_SSIM if metric.name == "registered" else metric.name
    shapes = {tuple(pairs.train.shape[1:])} if isinstance(pairs.train, np.ndarray) else set()
    thresholds = replace(
        found,
        score=score,
        image_shape=next(iter(shapes)) if len(shapes) == 1 and score in (REGISTERED_SSIM, "ssim") else None,
        model=metric.fingerprint.split(":")[-1] if metric.is_embedding else None,
    )
    intervals = calibration_intervals(scores, pairs.labels, bootstrap, seed) if bootstrap else {}
    if out is not None:
        source = getattr(metric, "source", metric.description)
        thresholds.save(
            out,
            metric=metric.name,
            model_name=str(source),
            macro_f1=f1,
            pairs=len(pairs.labels),
            pairs_by_class=counts,
            **intervals,
        )
    return Calibration(thresholds, f1, counts, intervals)


def classification_numbers(
    scores: np.ndarray, labels: np.ndarray, thresholds: Thresholds, classes=None
) -> dict:
    """Every number of the protocol for one set of scores, labels and thresholds.

    classes: the labels that macro- and weighted F1 average over (default: those in ``labels``;
    the same set calibration optimises). TPR at 5% FPR is the highest true-positive rate of any
    threshold whose false-positive rate is at most 5% (no interpolation between thresholds).
    """
    from sklearn.metrics import (
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
        roc_curve,
        silhouette_score,
    )

    classes = sorted(set(labels.tolist())) if classes is None else list(classes)
    predicted = classify(scores, thresholds)
    precision, recall, _, _ = precision_recall_fscore_support(
        labels, predicted, labels=list(Label), zero_division=0
    )
    numbers = {
        "macro_f1": f1_score(labels, predicted, labels=classes, average="macro", zero_division=0),
        "weighted_f1": f1_score(labels, predicted, labels=classes, average="weighted", zero_division=0),
    }
    for i, label in enumerate(Label):
        numbers[f"precision_{label.title}"] = precision[i]
        numbers[f"recall_{label.title}"] = recall[i]
    distinct = len(np.unique(labels))
    numbers["silhouette"] = (
        silhouette_score(scores.reshape(-1, 1), labels) if 2 <= distinct < len(labels) else np.nan
    )
    duplicate = labels == Label.DUPLICATE
    if 0 < duplicate.sum() < len(labels):
        fpr, tpr, _ = roc_curve(duplicate, scores)
        numbers["tpr_at_5fpr"] = float(tpr[fpr <= FPR_AT].max())
        numbers["auroc"] = roc_auc_score(duplicate, scores)
    else:
        numbers["tpr_at_5fpr"] = numbers["auroc"] = np.nan
    return {k: float(v) for k, v in numbers.items()}


def with_bootstrap(scores, labels, thresholds, repeats: int, seed: int) -> dict:
    """The numbers and, for each, the 2.5th and 97.5th percentiles over bootstrap resamples.

    The resampling is stratified by class (each class resampled to its own size), so every
    resample has every class of the test set.
    """
    classes = sorted(set(labels.tolist()))
    numbers = classification_numbers(scores, labels, thresholds, classes)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in classes]
    samples = {k: [] for k in numbers}
    for _ in range(repeats):
        rows = np.concatenate([rng.choice(m, len(m)) for m in members])
        for k, v in classification_numbers(scores[rows], labels[rows], thresholds, classes).items():
            samples[k].append(v)
    out = {}
    for k, v in numbers.items():
        values = np.array(samples[k], dtype=float)
        values = values[np.isfinite(values)]
        low, high = np.percentile(values, [2.5, 97.5]) if len(values) else (np.nan, np.nan)
        out.update({k: v, f"{k}_ci_low": float(low), f"{k}_ci_high": float(high)})
    return out


HEADLINE = ["macro_f1", "weighted_f1", "silhouette", "tpr_at_5fpr", "auroc"]


@dataclass(frozen=True)
class EvaluateSettings:
    """How to run the protocol (everything but the data and the model), validated when made.

    metrics: metric specs as ``--metric`` takes them. setting: aligned pairs, misaligned views
    of them (the paper's flips and rotations), or both. calib_split / test_split: values of the
    pairs file's ``split`` column; thresholds fitted on the calibration split are scored on the
    test split (default: every pair not in the calibration split). bootstrap: resamples of the
    test pairs for the 95% intervals. seed: the misaligned views and the bootstrap.
    """

    metrics: tuple[str, ...] = field(
        default=("deepssim", "ssim"),
        metadata=option(
            "comma-separated: deepssim[=MODEL], ssim, registered, fsim, sscd=FILE, dar=FILE, "
            "semdedup=ARCH:FILE"
        ),
    )
    setting: Literal["aligned", "misaligned", "both"] = field(
        default="both", metadata=option("aligned pairs, misaligned views of them, or both")
    )
    calib_split: str | None = field(
        default=None, metadata=option("split whose pairs calibrate thresholds (e.g. calib)")
    )
    test_split: str | None = field(
        default=None,
        metadata=option("split whose pairs are scored (default: all pairs not in --calib-split)"),
    )
    bootstrap: int = field(default=1000, metadata=option("bootstrap resamples for the CIs"))
    seed: int = field(default=0, metadata=option("seed of the misaligned views and the bootstrap"))
    device: str = field(default="cpu", metadata=option("cpu or cuda"))

    def __post_init__(self) -> None:
        check_literal_fields(self)
        if not self.metrics:
            raise DeepSSIMError("name at least one metric to evaluate")
        if self.bootstrap < 0:
            raise DeepSSIMError(f"bootstrap must be 0 or more, not {self.bootstrap}")

    @property
    def views(self) -> tuple[str, ...]:
        return SETTINGS if self.setting == "both" else (self.setting,)

    @classmethod
    def choices(cls, name: str) -> tuple[str, ...]:
        return choices(cls, name)


def evaluate(
    pairs_csv,
    train,
    generated,
    *,
    settings: EvaluateSettings = EvaluateSettings(),
    model="default",
    options: LoadOptions | None = None,
    out_dir=None,
    progress: bool = False,
) -> list[dict]:
    """Run the protocol; returns one row per metric x setting x threshold source (and writes
    metrics.csv, metrics.md, scores.csv, evaluation.json (the settings) and one histogram per
    metric and setting to ``out_dir``). ``settings.metrics`` may also hold metric objects."""
    calib_split, test_split, seed = settings.calib_split, settings.test_split, settings.seed
    pairs = read_labelled_pairs(pairs_csv, train, generated, options, progress)
    calibration = None if calib_split is None else pairs.splits == calib_split
    if test_split is not None:
        test = pairs.splits == test_split
    elif calibration is not None:
        test = ~calibration  # never score thresholds on the pairs they were fitted on
    else:
        test = np.ones(len(pairs.labels), dtype=bool)
    if not test.any():
        raise DeepSSIMError(f"{pairs_csv}: no pairs in the test split {test_split!r}")
    if calibration is not None and not calibration.any():
        raise DeepSSIMError(f"{pairs_csv}: no pairs in the calibration split {calib_split!r}")
    views = {"aligned": (pairs.train, pairs.generated)}
    if "misaligned" in settings.views:
        views["misaligned"] = (
            misaligned_views(pairs.train, seed),
            misaligned_views(pairs.generated, seed + 1),
        )
    rows, all_scores = [], {}
    for spec in settings.metrics:
        metric = spec if isinstance(spec, SimilarityMetric) else load_metric(spec, settings.device, model)
        for setting in settings.views:
            scores = np.asarray(metric.pair_scores(*views[setting]), dtype=np.float64)
            all_scores[f"{metric.name}_{setting}"] = scores
            sources = []
            if metric.thresholds is None and calibration is None:
                warnings.warn(
                    f"{metric.name} has no published thresholds: pass --calib-split to evaluate it",
                    stacklevel=2,
                )
            if metric.thresholds is not None:
                sources.append(Thresholds(*metric.thresholds, "paper"))
            if calibration is not None:
                sources.append(
                    Thresholds(*_calibrated(scores[calibration], pairs.labels[calibration]), "calibrated")
                )
            for thresholds in sources:
                numbers = with_bootstrap(
                    scores[test], pairs.labels[test], thresholds, settings.bootstrap, seed
                )
                rows.append(
                    {
                        "metric": metric.name,
                        "setting": setting,
                        "thresholds": thresholds.source,
                        "low": thresholds.low,
                        "high": thresholds.high,
                        "pairs": int(test.sum()),
                        **numbers,
                    }
                )
            if out_dir is not None:
                _histogram(
                    Path(out_dir) / f"histogram_{metric.name}_{setting}.png",
                    scores[test],
                    pairs.labels[test],
                    sources,
                    f"{metric.name}, {setting}",
                )
    if out_dir is not None:
        _write_outputs(Path(out_dir), rows, all_scores, pairs)
        recorded = {f.name: getattr(settings, f.name) for f in fields(settings)}
        recorded["metrics"] = [getattr(m, "name", m) for m in settings.metrics]
        write_text_atomic(Path(out_dir) / "evaluation.json", json.dumps(recorded, indent=2) + "\n")
    return rows


def _calibrated(scores, labels) -> tuple[float, float]:
    thresholds, _ = calibrate(scores, labels)
    return thresholds.low, thresholds.high


def _write_outputs(out_dir: Path, rows: list[dict], scores: dict, pairs: LabelledPairs) -> None:
    write_rows_atomic(out_dir / "metrics.csv", rows, None if rows else ["metric"])
    write_text_atomic(out_dir / "metrics.md", metrics_markdown(rows))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["train_key", "generated_key", "label", "split", *scores])
    for i, row in enumerate(pairs.rows):
        values = [f"{scores[name][i]:.6f}" for name in scores]
        writer.writerow(
            [row["train_key"], row["generated_key"], Label(pairs.labels[i]).title, pairs.splits[i], *values]
        )
    write_text_atomic(out_dir / "scores.csv", buffer.getvalue())


def metrics_markdown(rows: list[dict]) -> str:
    """The headline table: each number with its bootstrap 95% interval."""
    columns = ["metric", "setting", "thresholds", "low / high", "macro-F1", "weighted F1", "silhouette"]
    columns += ["TPR@5%FPR", "AUROC"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row["metric"], row["setting"], row["thresholds"], f"{row['low']:.4g} / {row['high']:.4g}"]
        for name in HEADLINE:
            cells.append(f"{row[name]:.3f} [{row[name + '_ci_low']:.3f}, {row[name + '_ci_high']:.3f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _histogram(path: Path, scores, labels, sources, title) -> None:
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is

    colours = {Label.DIFFERENT: "#4a9a5b", Label.SIMILAR: "#e1a526", Label.DUPLICATE: "#c0392b"}
    bins = np.linspace(min(scores.min(), 0.0), max(scores.max(), 1.0), 41)
    figure = Figure(figsize=(7, 3.4))
    axes = figure.subplots()
    for label in Label:
        if (labels == label).any():
            axes.hist(
                scores[labels == label],
                bins=bins,
                alpha=0.6,
                color=colours[label],
                label=f"{label.title} ({int((labels == label).sum())})",
            )
    styles = {"paper": "--", "calibrated": ":"}
    for thresholds in sources:
        for value in sorted({thresholds.low, thresholds.high}):
            axes.axvline(value, color="#222", linestyle=styles.get(thresholds.source, "-"), linewidth=1)
    axes.set_title(f"{title} (dashed: paper thresholds, dotted: calibrated)", fontsize=9)
    axes.set_xlabel("score")
    axes.set_ylabel("pairs")
    axes.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=100, bbox_inches="tight")
