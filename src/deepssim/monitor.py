"""Watch a generator for memorisation while it trains.

A training loop calls the monitor every step; every ``every`` steps it draws a few images from
the caller's sampler, retrieves each image's nearest training images with DeepSSIM (the
training set is embedded once, at the start), lets registered SSIM decide as the scan's
two-stage decision does, and logs the Duplicate share, percentiles of the best scores and the
training groups (patients) hit, to CSV and, when installed, TensorBoard. It can ask the loop to
stop once the Duplicate share reaches a limit.

    monitor = MemorisationMonitor("train_dir", every=500, samples=16, stop_share=0.25, log="memorisation.csv")
    for step, batch in enumerate(loader):
        ...  # one optimisation step
        if monitor(step, lambda n: model.sample(n)).stop:
            break
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.execution.search import top_k_embeddings
from deepssim.io.load import ImageSet, LoadOptions
from deepssim.labels import PAPER_THRESHOLDS, Label
from deepssim.metrics.deepssim_metric import DeepSSIMMetric
from deepssim.scanning.decide import Thresholds, decide
from deepssim.scanning.groups import group_of_each_image
from deepssim.ssim.registered import register_pairs

Sampler = Callable[[int], np.ndarray]  # n -> (n, H, W) images of the training images' size


@dataclass(frozen=True)
class MonitorRecord:
    """One check: what the generator made at ``step``."""

    step: int
    samples: int
    duplicate_share: float
    similar_share: float
    best_p50: float
    best_p90: float
    best_max: float
    groups_hit: int
    stop: bool


@dataclass(frozen=True)
class SampleMatches:
    """Each sample of the last check: its best training image (index), that pair's registered SSIM
    and its class (for callers that log per-sample results)."""

    nearest: np.ndarray
    best: np.ndarray
    classes: np.ndarray


class MemorisationMonitor:
    """train: the generator's training images (folders, files, an ImageSet, or an (N, H, W)
    array, read once and kept in memory). every: check
    every this many steps (step 0 included). samples: images drawn per check. k: training
    images retrieved per sample. group_by: "volume", "folder" or a regex naming each training
    image's patient (as in ``scan --group-by``); without it every training image is its own
    group; with an array, ``groups`` names each image's group instead. stop_share: the
    Duplicate share at which ``stop`` becomes True (None: never). log: a CSV file that gets
    one row per check (appended, so a resumed run continues it).
    tensorboard: a log folder for ``torch.utils.tensorboard`` (skipped, with a warning, if
    TensorBoard is not installed)."""

    def __init__(
        self,
        train,
        *,
        every: int = 500,
        samples: int = 16,
        k: int = 5,
        model="default",
        thresholds: tuple[float, float] = PAPER_THRESHOLDS,
        group_by: str | None = None,
        groups: list[str] | None = None,
        stop_share: float | None = None,
        log: str | Path | None = None,
        tensorboard: str | Path | None = None,
        options: LoadOptions | None = None,
        precision: str = "float32",
    ):
        if every < 1 or samples < 1 or k < 1:
            raise DeepSSIMError("every, samples and k must be at least 1")
        if stop_share is not None and not 0 < stop_share <= 1:
            raise DeepSSIMError(f"stop_share must be in (0, 1], not {stop_share}")
        if isinstance(train, np.ndarray):
            self.images = np.asarray(train, dtype=np.float32)
            names = list(groups) if groups is not None else [f"train_{i}" for i in range(len(train))]
        else:
            image_set = ImageSet.coerce(train, options)
            self.images = image_set.read().astype(np.float32)
            names = group_of_each_image(image_set, group_by) if group_by else image_set.keys
        if self.images.ndim != 3 or len(names) != len(self.images):
            raise DeepSSIMError("the training images must be (N, H, W), with one group name per image")
        self.groups = np.asarray(names)
        self.every, self.samples, self.k = every, samples, min(k, len(self.images))
        self.metric = model if isinstance(model, DeepSSIMMetric) else DeepSSIMMetric(model)
        self.thresholds = Thresholds(*thresholds, "monitor")
        self.precision = precision
        self.stop_share = stop_share
        self.log = Path(log) if log is not None else None
        self.vectors = self.metric.embed(self.images, precision=precision)
        self.records: list[MonitorRecord] = []
        self.last_matches: SampleMatches | None = None
        self.writer = _tensorboard(tensorboard)

    def __call__(self, step: int, sampler: Sampler) -> MonitorRecord | _NotDue:
        """Check at ``step`` if it is due; otherwise return a record-like object with stop False."""
        if step % self.every:
            return _NOT_DUE
        return self.check(step, sampler(self.samples))

    def check(self, step: int, images: np.ndarray) -> MonitorRecord:
        """Scan ``images`` (n, H, W) against the training set now and log the result."""
        images = np.asarray(images, dtype=np.float64)
        if images.ndim != 3 or images.shape[1:] != self.images.shape[1:]:
            height, width = self.images.shape[1:]
            raise DeepSSIMError(f"the sampler must return (n, {height}, {width}) images, got {images.shape}")
        queries = self.metric.embed(images, precision=self.precision)
        neighbours = top_k_embeddings(queries, self.vectors, self.k)[1]  # no reverse search needed
        train = self.images[neighbours.ravel()].astype(np.float64)
        registered = register_pairs(train, np.repeat(images, neighbours.shape[1], axis=0)).ssim_registered
        registered = registered.reshape(neighbours.shape)
        order, classes = decide(registered, self.thresholds)
        rows = np.arange(len(images))
        best, nearest = registered[rows, order[:, 0]], neighbours[rows, order[:, 0]]
        self.last_matches = SampleMatches(nearest, best, classes)
        duplicate = classes == Label.DUPLICATE
        share = float(np.mean(duplicate))
        record = MonitorRecord(
            step=int(step),
            samples=len(images),
            duplicate_share=share,
            similar_share=float(np.mean(classes == Label.SIMILAR)),
            best_p50=float(np.percentile(best, 50)),
            best_p90=float(np.percentile(best, 90)),
            best_max=float(best.max()),
            groups_hit=len(set(self.groups[nearest[duplicate]].tolist())),
            stop=self.stop_share is not None and share >= self.stop_share,
        )
        self.records.append(record)
        self._write(record)
        return record

    def _write(self, record: MonitorRecord) -> None:
        if self.log is not None:
            new = not self.log.is_file()
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log, "a", newline="") as handle:
                writer = csv.DictWriter(handle, list(asdict(record)))
                if new:
                    writer.writeheader()
                writer.writerow(asdict(record))
        if self.writer is not None:
            for name, value in asdict(record).items():
                if name not in ("step", "stop"):
                    self.writer.add_scalar(f"memorisation/{name}", value, record.step)
            self.writer.flush()


class _NotDue:
    """What the monitor returns between checks: nothing to log, never a stop."""

    stop = False


_NOT_DUE = _NotDue()


def _tensorboard(folder):
    if folder is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        import warnings

        warnings.warn(
            "TensorBoard is not installed (pip install tensorboard); logging to CSV only", stacklevel=3
        )
        return None
    return SummaryWriter(str(folder))
