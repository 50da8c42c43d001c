"""The volume scan: every generated 3D volume against the training volumes (``scan --unit volume``).

An ethics board asks whether a patient's *volume* was reproduced; a slice-level scan answers
for slices. Stages, each volume read when needed so memory holds a few volumes at a time:

1. index: headers only (:class:`deepssim.io.volumes.VolumeSet`), every bad input refused first;
2. embed: the DeepSSIM embedding of every content slice (not background) along ``plane``;
3. retrieve: each generated volume's ``k`` candidate training volumes, by ``votes`` (each
   generated slice votes, with its cosine, for the volume of its most similar training slice, so
   a copied slab of a few slices still points at its source) or ``pooled`` (cosine of the volumes'
   mean slice embeddings);
4. register: 3D registered SSIM of each candidate pair (:mod:`deepssim.ssim.registered3d`);
5. decide: the best pair's *foreground* score against thresholds of the score
   ``registered-ssim-3d`` (default the paper's 0.6 / 0.85 carried to 3D, not calibrated on
   volumes); a volume with a *copied slab* (``min_slab`` or more consecutive slices whose SSIM
   exceeds the high threshold) is at least Similar, and the slab is reported by slice;
6. outputs: results.csv, pairs.csv, slices.csv (per-slice evidence of the best pair of every
   volume not Different: each slice's SSIM, the paper's 2D rule on the training slice and the
   aligned generated slice), groups.csv, summary.json and report.html (three orthogonal views of
   each flagged pair, aligned, with the local SSIM).

Why a foreground score: a volume is mostly background, and two different heads on identical
empty backgrounds (skull-stripped or generated volumes) share most of their 3D SSIM map; their
whole-volume 3D SSIM (the paper's rule carried to 3D, reported as ``ssim3d``) is then high for
any two heads. The decision averages the registered pair's 3D SSIM map over the foreground only:
the windows centred on a voxel that is content in either volume (above its minimum + 10% of
its range) and lying wholly inside the moved generated volume's field of view.

Why slabs are found by 2D SSIM: each slice is z-scored on its own, so a slab pasted into another
head keeps its SSIM of 1 whatever the rest of the volume does to the 3D z-scoring.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from deepssim.errors import DeepSSIMError
from deepssim.io.files import atomic_folder, check_output_folder, write_rows_atomic, write_text_atomic
from deepssim.io.orientation import PLANES, plane_axis
from deepssim.io.volumes import VolumeSet
from deepssim.labels import PAPER_THRESHOLDS, Label
from deepssim.progress import progress_iter
from deepssim.scanning.decide import Thresholds, share
from deepssim.scanning.groups import group_pattern
from deepssim.ssim.engine import ssim_pairs
from deepssim.ssim.registered3d import VolumeRegistration, register_volumes, warp_volume
from deepssim.ssim.volume import WINDOW, ssim3d_map

VOLUME_SCORE = "registered-ssim-3d"
RETRIEVALS = ("votes", "pooled")
CONTENT_LEVEL = 0.1  # a voxel is content above min + 10% of the volume's range ...
CONTENT_SHARE = 0.05  # ... and a slice with at least 5% content is embedded


@dataclass(frozen=True)
class VolumeScanSettings:
    """How to scan volumes. k: candidate training volumes registered per generated volume; plane:
    the anatomical plane whose slices are embedded and reported; retrieval: votes or pooled;
    min_slab: consecutive slices above the high threshold that make a copied slab; group_by:
    volume, folder, or a regex with one group taking the patient ID from each training key."""

    k: int = 10
    plane: str = "axial"
    retrieval: str = "votes"
    min_slab: int = 5
    group_by: str | None = None
    batch_size: int = 64
    precision: str = "auto"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise DeepSSIMError(f"-k must be a positive integer, not {self.k!r}")
        plane_axis(self.plane)
        if self.retrieval not in RETRIEVALS:
            raise DeepSSIMError(
                f"volume retrieval must be one of {', '.join(RETRIEVALS)}, not {self.retrieval!r}"
            )
        if not isinstance(self.min_slab, int) or self.min_slab < 1:
            raise DeepSSIMError(
                f"the minimum slab must be a positive number of slices, not {self.min_slab!r}"
            )
        if self.group_by not in (None, "folder", "volume"):
            group_pattern(self.group_by)


@dataclass
class VolumeMatch:
    """One registered (training volume, generated volume) pair; slice_scores: the SSIM of each
    slice along the scan's plane (training slice, aligned generated slice; NaN where neither
    slice holds content)."""

    train_index: int
    retrieval_score: float
    registration: VolumeRegistration
    score: float  # the registered pair's foreground 3D SSIM: what decides
    slice_scores: np.ndarray


@dataclass
class VolumeScanResult:
    """Every generated volume's candidates (best registered score first), class and copied slabs."""

    train: VolumeSet
    generated: VolumeSet
    settings: VolumeScanSettings
    thresholds: Thresholds
    matches: list[list[VolumeMatch]]
    classes: np.ndarray
    slabs: list[list[tuple[int, int, float]]]
    stages: dict = field(default_factory=dict)
    model: str = ""
    groups: list[dict] | None = None

    @property
    def decision_scores(self) -> np.ndarray:
        return np.array([m[0].score for m in self.matches])

    def summary(self) -> dict:
        counts = {label.title: int((self.classes == label).sum()) for label in Label}
        n = len(self.classes)
        return {
            "unit": "volume",
            "training_volumes": len(self.train),
            "generated_volumes": n,
            "grid": list(self.train.shape),
            "spacing_mm": list(self.train.spacing),
            "classes": {name: share(count, n) for name, count in counts.items()},
            "volumes_with_a_copied_slab": sum(bool(s) for s in self.slabs),
            "thresholds": asdict(self.thresholds),
            "settings": asdict(self.settings),
            "model": self.model,
            "seconds_by_stage": {k: round(v, 2) for k, v in self.stages.items()},
        }

    def text(self) -> str:
        s = self.summary()
        parts = [f"{s['classes'][name]['count']} {name}" for name in ("Duplicate", "Similar", "Different")]
        return (
            f"{s['generated_volumes']} generated volumes against {s['training_volumes']} training volumes "
            f"({'x'.join(map(str, s['grid']))} voxels): {', '.join(parts)}; "
            f"{s['volumes_with_a_copied_slab']} with a copied slab"
        )

    def save(self, out_dir: str | Path, *, report: bool = True, overwrite: bool = False) -> dict:
        """results.csv, pairs.csv, slices.csv, summary.json (groups.csv, report.html) into
        ``out_dir``, written whole under a temporary name and renamed at the end."""
        out_dir = Path(out_dir)
        check_output_folder(out_dir, overwrite=overwrite, inputs=[*self.train.paths, *self.generated.paths])
        with atomic_folder(out_dir, overwrite=overwrite) as partial:
            files = {name: partial / f"{name}.csv" for name in ("results", "pairs", "slices")}
            write_rows_atomic(files["results"], self._results_rows())
            write_rows_atomic(files["pairs"], self._pairs_rows())
            write_rows_atomic(
                files["slices"],
                self._slices_rows(),
                ["generated_key", "train_key", "plane", "slice", "ssim"],
            )
            files["summary"] = partial / "summary.json"
            write_text_atomic(files["summary"], json.dumps(self.summary(), indent=2) + "\n")
            if self.groups is not None:
                files["groups"] = partial / "groups.csv"
                write_rows_atomic(files["groups"], self.groups)
            if report:
                files["report"] = partial / "report.html"
                write_text_atomic(files["report"], self._report_html())
        return {name: out_dir / path.relative_to(partial) for name, path in files.items()}

    def _slab_text(self, i: int) -> str:
        return "; ".join(f"{self.settings.plane} {a}-{b} ({s:.3f})" for a, b, s in self.slabs[i])

    def _results_rows(self) -> list[dict]:
        rows = []
        for i, key in enumerate(self.generated.keys):
            best = self.matches[i][0]
            row = {
                "generated_key": key,
                "class": Label(int(self.classes[i])).title,
                "decision_score": f"{best.score:.6f}",
                "copied_slabs": self._slab_text(i),
                "top1_train_key": self.train.keys[best.train_index],
                "top1_retrieval_score": f"{best.retrieval_score:.6f}",
                "top1_ssim3d": f"{best.registration.ssim_plain:.6f}",
                "top1_ssim3d_registered": f"{best.registration.ssim_registered:.6f}",
                "top1_transform": best.registration.transform.text(),
                "top1_best_slice_ssim": f"{float(np.nanmax(best.slice_scores, initial=-1.0)):.6f}",
            }
            rows.append(row)
        return rows

    def _pairs_rows(self) -> list[dict]:
        return [
            {
                "generated_key": key,
                "rank": rank + 1,
                "train_key": self.train.keys[m.train_index],
                "retrieval_score": f"{m.retrieval_score:.6f}",
                "decision_score": f"{m.score:.6f}",
                "ssim3d_registered": f"{m.registration.ssim_registered:.6f}",
                "ssim3d": f"{m.registration.ssim_plain:.6f}",
                "transform": m.registration.transform.text(),
            }
            for key, matches in zip(self.generated.keys, self.matches, strict=True)
            for rank, m in enumerate(matches)
        ]

    def _slices_rows(self) -> list[dict]:
        rows = []
        for i, key in enumerate(self.generated.keys):
            if self.classes[i] == Label.DIFFERENT:
                continue
            best = self.matches[i][0]
            for j, value in enumerate(best.slice_scores):
                if not np.isfinite(value):
                    continue
                rows.append(
                    {
                        "generated_key": key,
                        "train_key": self.train.keys[best.train_index],
                        "plane": self.settings.plane,
                        "slice": j,
                        "ssim": f"{float(value):.6f}",
                    }
                )
        return rows

    def _report_html(self) -> str:
        flagged = [i for i in np.argsort(-self.decision_scores) if self.classes[i] != Label.DIFFERENT]
        s = self.summary()
        counts = ", ".join(f"{c['count']} {name}" for name, c in s["classes"].items())
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'><title>DeepSSIM volume scan</title>",
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px}</style></head><body>",
            "<h1>DeepSSIM volume scan</h1>",
            f"<p>{html.escape(self.text())}.</p>",
            f"<p>Classes: {html.escape(counts)}. Thresholds of {VOLUME_SCORE}: low {self.thresholds.low}, "
            f"high {self.thresholds.high} ({html.escape(self.thresholds.source)}).</p>",
        ]
        if not flagged:
            parts.append("<p>No generated volume is a Duplicate or Similar.</p>")
        for i in flagged:
            best = self.matches[i][0]
            title = (
                f"{self.generated.keys[i]}: {Label(int(self.classes[i])).title}, 3D registered SSIM "
                f"{best.score:.3f} against {self.train.keys[best.train_index]}"
            )
            slab = self._slab_text(i)
            parts.append(f"<h2>{html.escape(title)}</h2>")
            if slab:
                parts.append(f"<p>Copied slab: {html.escape(slab)}</p>")
            png = orthogonal_views_png(
                self.train.read(best.train_index),
                self.generated.read(i),
                best.registration,
                self.slabs[i],
                plane_axis(self.settings.plane),
            )
            parts.append(f"<img alt='three orthogonal views' src='data:image/png;base64,{png}'>")
        parts.append("</body></html>")
        return "\n".join(parts)


def orthogonal_views_png(train, generated, registration, slabs, axis: int) -> str:
    """Base64 PNG: sagittal, coronal and axial sections through the copied slab's centre (else the
    volume's centre) of the training volume, the generated volume aligned to it, and the local SSIM."""
    from matplotlib.figure import Figure

    aligned = aligned_volume(generated, registration)
    local = np.pad(ssim3d_map(train, aligned), WINDOW // 2, mode="constant", constant_values=np.nan)
    centre = [n // 2 for n in train.shape]
    if slabs:
        first, last, _ = max(slabs, key=lambda s: s[1] - s[0])
        centre[axis] = (first + last) // 2
    figure = Figure(figsize=(9, 9))
    axes = figure.subplots(3, 3)
    rows = (("training", train, "gray", None), ("generated, aligned", aligned, "gray", None))
    rows += (("local 3D SSIM", local, "magma", (0, 1)),)
    for r, (name, volume, cmap, limits) in enumerate(rows):
        for c, (plane, plane_index) in enumerate(PLANES.items()):
            section = np.take(volume, centre[plane_index], axis=plane_index).T  # RAS: superior/anterior up
            ax = axes[r, c]
            vmin, vmax = limits if limits else (None, None)
            ax.imshow(section, cmap=cmap, origin="lower", vmin=vmin, vmax=vmax)
            ax.set_title(f"{name}\n{plane} {centre[plane_index]}", fontsize=8)
            ax.axis("off")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _moved(registration: VolumeRegistration) -> bool:
    """Registration moved the generated volume (it stays where the plain pair scored as well)."""
    return registration.ssim_registered > registration.ssim_plain


def aligned_volume(generated: np.ndarray, registration: VolumeRegistration) -> np.ndarray:
    """The generated volume as registration aligned it (untouched where the plain pair won)."""
    if not _moved(registration):
        return generated
    return warp_volume(generated, registration.transform)


def foreground(volume: np.ndarray) -> np.ndarray:
    """Voxels of content: above the volume's minimum + 10% of its range."""
    return volume > volume.min() + CONTENT_LEVEL * np.ptp(volume)


def in_view(generated: np.ndarray, registration: VolumeRegistration) -> np.ndarray:
    """Voxels of the aligned generated volume that come from inside its field of view (a move
    brings in voxels from outside it, filled with the background)."""
    if not _moved(registration):
        return np.ones(generated.shape, dtype=bool)
    inside = warp_volume(np.ones(generated.shape), registration.transform, fill=0.0, order=1)
    return inside > 1 - 1e-6


def foreground_ssim3d(train: np.ndarray, aligned: np.ndarray, valid: np.ndarray | None = None) -> float:
    """The 3D SSIM map of a registered pair averaged over the windows centred on a voxel of
    content in either volume and lying wholly in view (``valid``: the aligned volume's voxels
    from inside its field of view; a head that fills its grid loses its corners when moved, and
    that loss is not a difference between the two heads)."""
    r = WINDOW // 2
    mask = foreground(train) | foreground(aligned)
    if valid is not None:
        mask &= ndimage.minimum_filter(valid.astype(np.uint8), size=WINDOW, mode="constant").astype(bool)
    mask = mask[(slice(r, -r),) * 3]
    if not mask.any():
        raise DeepSSIMError("a pair of volumes without foreground cannot be compared; is one empty?")
    return float(ssim3d_map(train, aligned)[mask].mean())


def slice_ssim(train: np.ndarray, aligned: np.ndarray, axis: int) -> np.ndarray:
    """SSIM (the paper's 2D rule) of each pair of slices along ``axis``; NaN where neither slice
    holds content, 0 where one of them is constant."""
    scores = np.full(train.shape[axis], np.nan)
    rows = np.union1d(content_slices(train, axis), content_slices(aligned, axis))
    if len(rows) == 0:
        return scores
    a, b = np.moveaxis(train, axis, 0)[rows], np.moveaxis(aligned, axis, 0)[rows]
    varies = (a.reshape(len(a), -1).std(axis=1) > 0) & (b.reshape(len(b), -1).std(axis=1) > 0)
    scores[rows] = 0.0
    if varies.any():
        scores[rows[varies]] = ssim_pairs(a[varies], b[varies])
    return scores


def content_slices(volume: np.ndarray, axis: int) -> np.ndarray:
    """Indices of the slices along ``axis`` that hold content (not background): at least 5% of
    their voxels above the volume's minimum + 10% of its range, and not constant."""
    moved = np.moveaxis(volume, axis, 0)
    level = volume.min() + CONTENT_LEVEL * np.ptp(volume)
    share_above = (moved > level).mean(axis=(1, 2))
    varies = moved.reshape(len(moved), -1).std(axis=1) > 0
    return np.flatnonzero((share_above >= CONTENT_SHARE) & varies)


def copied_slabs(slice_scores: np.ndarray, high: float, min_slab: int) -> list[tuple[int, int, float]]:
    """(first slice, last slice, mean SSIM) of every run of at least ``min_slab`` slices whose SSIM
    exceeds ``high``."""
    above = np.concatenate([[False], np.nan_to_num(slice_scores, nan=-np.inf) > high, [False]])
    edges = np.flatnonzero(np.diff(above.astype(np.int8)))
    return [
        (int(start), int(stop - 1), float(slice_scores[start:stop].mean()))
        for start, stop in zip(edges[::2], edges[1::2], strict=True)
        if stop - start >= min_slab
    ]


def _volume_thresholds(thresholds) -> Thresholds:
    if thresholds is None:
        return Thresholds(
            *PAPER_THRESHOLDS,
            "the paper's 2D thresholds carried to 3D (not calibrated on volumes)",
            score=VOLUME_SCORE,
        )
    if isinstance(thresholds, Thresholds):
        if thresholds.score and thresholds.score != VOLUME_SCORE:
            raise DeepSSIMError(
                f"the thresholds ({thresholds.source}) belong to {thresholds.score}, but the volume scan "
                f"decides with {VOLUME_SCORE}; give --low/--high for volumes instead"
            )
        return Thresholds(thresholds.low, thresholds.high, thresholds.source, score=VOLUME_SCORE)
    low, high = thresholds
    default_low, default_high = PAPER_THRESHOLDS
    return Thresholds(
        default_low if low is None else float(low),
        default_high if high is None else float(high),
        "given" if (low, high) != (None, None) else "paper",
        score=VOLUME_SCORE,
    )


def scan_volumes(
    train,
    generated,
    *,
    settings: VolumeScanSettings | None = None,
    model="default",
    thresholds: Thresholds | tuple[float | None, float | None] | None = None,
    spacing: tuple[float, float, float] | None = None,
    progress: bool = False,
) -> VolumeScanResult:
    """Scan generated volumes against training volumes (folders or NIfTI files); see the module.

    thresholds: of ``registered-ssim-3d`` (a :class:`Thresholds` of another score is refused), or
    (low, high) with None for the default. spacing: resample every volume to this voxel size (mm).
    """
    from deepssim.metrics import load_metric

    settings = settings or VolumeScanSettings()
    thresholds = _volume_thresholds(thresholds)
    stages: dict[str, float] = {}
    started = time.perf_counter()
    train_set = VolumeSet.index(train, "training", spacing)
    generated_set = VolumeSet.index(generated, "generated", spacing)
    train_set.check_matches(generated_set)
    groups = None
    if settings.group_by:
        groups = _group_of_each_volume(train_set, settings.group_by)
    axis = plane_axis(settings.plane)
    stages["index"] = time.perf_counter() - started

    metric = load_metric("deepssim", settings.device, default_model=model)
    lap = time.perf_counter()
    train_embedded = _embed_volumes(metric, train_set, axis, settings, progress, "training")
    generated_embedded = _embed_volumes(metric, generated_set, axis, settings, progress, "generated")
    stages["embed"] = time.perf_counter() - lap

    lap = time.perf_counter()
    retrieval = _retrieval_scores(train_embedded, generated_embedded, settings.retrieval)
    k = min(settings.k, len(train_set))
    candidates = np.argsort(-retrieval, axis=1, kind="stable")[:, :k]
    stages["retrieve"] = time.perf_counter() - lap

    lap = time.perf_counter()
    matches, classes, slabs = [], [], []
    for g in progress_iter(range(len(generated_set)), "registering volumes", "volume", progress):
        volume = generated_set.read(g)
        found = []
        for t in candidates[g]:
            reference = train_set.read(int(t))
            registration = register_volumes(reference, volume)
            aligned = aligned_volume(volume, registration)
            score = foreground_ssim3d(reference, aligned, in_view(volume, registration))
            slices = slice_ssim(reference, aligned, axis)
            found.append(VolumeMatch(int(t), float(retrieval[g, t]), registration, score, slices))
        found.sort(key=lambda m: -m.score)
        best = found[0]
        slab = copied_slabs(best.slice_scores, thresholds.high, settings.min_slab)
        if best.score > thresholds.high:
            label = Label.DUPLICATE
        elif best.score > thresholds.low or slab:
            label = Label.SIMILAR
        else:
            label = Label.DIFFERENT
        matches.append(found)
        classes.append(label)
        slabs.append(slab)
    stages["register"] = time.perf_counter() - lap
    classes = np.array(classes, dtype=np.int64)
    result = VolumeScanResult(
        train_set, generated_set, settings, thresholds, matches, classes, slabs, stages, metric.description
    )
    if groups is not None:
        result.groups = _group_rows(result, groups)
    return result


@dataclass
class _Embedded:
    """The content slices' embeddings of every volume of a set, concatenated, and their owners."""

    vectors: np.ndarray
    owner: np.ndarray
    pooled: np.ndarray


def _embed_volumes(metric, volumes: VolumeSet, axis: int, settings, progress: bool, role: str) -> _Embedded:
    vectors, owners, pooled = [], [], []
    for i in progress_iter(range(len(volumes)), f"embedding {role} volumes", "volume", progress):
        volume = volumes.read(i)
        rows = content_slices(volume, axis)
        if len(rows) == 0:
            raise DeepSSIMError(f"{volumes.paths[i]}: no slice holds anything but background; is it empty?")
        slices = np.ascontiguousarray(np.moveaxis(volume, axis, 0)[rows])
        embedded = metric.embed(slices, batch_size=settings.batch_size, precision=settings.precision)
        vectors.append(embedded)
        owners.append(np.full(len(embedded), i))
        mean = embedded.mean(axis=0)
        pooled.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
    return _Embedded(np.concatenate(vectors), np.concatenate(owners), np.stack(pooled))


def _retrieval_scores(train: _Embedded, generated: _Embedded, how: str) -> np.ndarray:
    """(M generated, N training) volume retrieval scores; see the module (votes or pooled)."""
    n = len(train.pooled)
    if how == "pooled":
        return generated.pooled @ train.pooled.T
    scores = np.zeros((len(generated.pooled), n))
    for g in range(len(generated.pooled)):
        mine = generated.vectors[generated.owner == g]
        cosine = mine @ train.vectors.T  # (slices of g, every training slice)
        best = cosine.argmax(axis=1)
        np.add.at(scores[g], train.owner[best], cosine[np.arange(len(mine)), best])
        scores[g] /= len(mine)
    return scores


def _group_of_each_volume(volumes: VolumeSet, group_by: str) -> list[str]:
    """The patient of each training volume: ``volume`` (each its own), ``folder`` (the folder
    holding it) or the one group of a regex matched against its key."""
    if group_by == "volume":
        return list(volumes.keys)
    if group_by == "folder":
        return [key.rsplit("/", 1)[0] if "/" in key else "." for key in volumes.keys]
    pattern = group_pattern(group_by)
    out = []
    for key, path in zip(volumes.keys, volumes.paths, strict=True):
        found = pattern.search(key)
        if found is None or found.group(1) is None:
            raise DeepSSIMError(
                f"--group-by '{group_by}' does not give a patient ID for the key {key!r} ({path})"
            )
        out.append(found.group(1))
    return out


def _group_rows(result: VolumeScanResult, groups: list[str]) -> list[dict]:
    copied: dict[str, int] = {}
    for i, matches in enumerate(result.matches):
        if result.classes[i] == Label.DUPLICATE:
            group = groups[matches[0].train_index]
            copied[group] = copied.get(group, 0) + 1
    return [
        {
            "group": group,
            "training_volumes": groups.count(group),
            "generated_volumes_with_a_duplicate": copied.get(group, 0),
        }
        for group in sorted(set(groups))
    ]
