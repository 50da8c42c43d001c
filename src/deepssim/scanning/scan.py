"""The main job: for every generated image, its nearest training images, scores and class.

``scan(train, generated)`` indexes both folders, embeds them with a DeepSSIM model (cached on
disk) or computes exact SSIM, finds the top-k training images of each generated image without
holding the full score matrix, classifies each generated image by its best score and
summarises the shares with 95% confidence intervals. ``ScanResult.save`` writes
``results.csv``, ``pairs.csv``, ``summary.json`` and ``report.html``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from deepssim.embedding.model import DeepSSIM
from deepssim.errors import DeepSSIMError
from deepssim.execution.engines import ScanEngine, get_engine
from deepssim.execution.search import top_k_other_groups
from deepssim.hardware import resolve_precision
from deepssim.io.files import atomic_folder, check_output_folder, write_rows_atomic, write_text_atomic
from deepssim.io.load import ImageSet, LoadOptions
from deepssim.metrics import SimilarityMetric, load_metric
from deepssim.scanning.audit import audit_trail
from deepssim.scanning.decide import (
    REFERENCE_PERCENTILE,
    REGISTERED_SSIM,
    Thresholds,
    check_threshold_values,
    conformal_threshold,
    decide,
    default_thresholds,
    reference_threshold,
    share,
)
from deepssim.scanning.groups import group_of_each_image, group_summary
from deepssim.scanning.registration import register_top_k
from deepssim.scanning.retrieve import exact_candidates, retrieve
from deepssim.scanning.settings import ScanSettings
from deepssim.scanning.summary import ScanSummary, percentiles, summarise
from deepssim.scanning.tables import pairs_csv, results_csv
from deepssim.ssim.registered import Registration


@dataclass
class ScanResult:
    """Top-k training matches of every generated image, their classes and the summary.

    scores, neighbours: (M, k) the metric's scores and indices into ``train_keys``. With the
    two-stage decision each row is ordered by registered SSIM, best first; else by score.
    evidence: registered and plain SSIM and the transform of the top-k pairs (every pair in the
    two-stage decision or with ``verify``; else the Duplicates only, NaN elsewhere).
    decision_scores: what the classes come from: registered SSIM (two-stage) or the score.
    classes: (M,) the :class:`Label` of each generated image's best pair.
    best_per_training_image: (N,) each training image's best score over all generated images.
    reference_scores: each training image's best score against the held-out real images
    (Dar et al.'s reference distribution), when given.
    best_other_scores: (M,) each generated image's best decision score against a training image of
    another patient (another group with ``group_by``, else another training image) among its top
    k; NaN where the top k hold none. The gap to the best pair is the decision's margin.
    reidentifies: (M,) with ``reidentify``: the generated image is closer to its best match's
    patient than any other patient's training image gets to that patient.
    """

    metric: str
    model: str
    train: ImageSet
    generated: ImageSet
    scores: np.ndarray
    neighbours: np.ndarray
    thresholds: Thresholds
    classes: np.ndarray
    summary: ScanSummary
    evidence: Registration | None = None
    decision: str = "score"
    embedder: DeepSSIM | None = None
    groups: list[dict] | None = None
    reference_scores: np.ndarray | None = None
    best_per_training_image: np.ndarray | None = None
    best_other_scores: np.ndarray | None = None
    reidentifies: np.ndarray | None = None
    files: dict = field(default_factory=dict)
    release: dict | None = None  # the release's summary, after save(release_dir=...)

    @property
    def decision_scores(self) -> np.ndarray:
        return self.evidence.ssim_registered if self.decision == "two-stage" else self.scores

    # built once: the tables look a key up per pair (building the list per lookup was most of
    # writing them at scale)
    @cached_property
    def train_keys(self) -> list[str]:
        return self.train.keys

    @cached_property
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

    def save(
        self,
        out_dir: str | Path,
        report: bool = True,
        gallery_size: int = 24,
        anonymise: bool = False,
        *,
        hash_keys: bool = False,
        overwrite: bool = False,
        progress: bool = False,
        release_dir: str | Path | None = None,
        release_drop: tuple[str, ...] = ("Duplicate",),
        release_check: str = "exact",
    ) -> dict:
        """Write results.csv, pairs.csv, summary.json (groups.csv) and report.html into ``out_dir``,
        complete or not at all: the folder is written under a temporary name beside it and renamed
        into place at the end (an existing non-empty folder is refused unless ``overwrite``, then
        replaced whole; an error or an interruption leaves no folder behind).

        anonymise: the report holds no image of anyone and no absolute path (see
        :mod:`deepssim.scanning.report`); hash_keys (with anonymise): every key and patient ID in
        the report becomes a salted SHA-256 hash, the salt kept in ``key-salt.txt`` (not to share).
        release_dir: also copy the generated images whose class is not in ``release_drop`` there
        (:func:`deepssim.scanning.release.write_release`); the manifest that names training
        images goes into ``out_dir`` as ``release.csv``; release_check: "exact" (default: every
        image to be released is first checked against every training image by exact SSIM, see
        :mod:`deepssim.scanning.release`) or "none". progress: bars for the gallery and the check.
        """
        out_dir = Path(out_dir)
        if hash_keys and not anonymise:
            raise DeepSSIMError(
                "hashed keys are for the anonymised report: pass --anonymise with --hash-keys"
            )
        if gallery_size < 0:
            raise DeepSSIMError(f"the gallery size must be 0 or more, not {gallery_size}")
        inputs = _input_locations(self.summary.audit)
        others = [("--release-dir", release_dir)] if release_dir is not None else []
        check_output_folder(out_dir, overwrite=overwrite, inputs=inputs, others=others)
        if release_dir is not None:
            check_output_folder(release_dir, inputs=inputs, option="--release-dir")
            if Path(release_dir).exists():
                raise DeepSSIMError(
                    f"--release-dir {release_dir} already exists; a release goes into a new folder"
                )
        with atomic_folder(out_dir, overwrite=overwrite) as partial:
            written = self._write_outputs(partial, report, gallery_size, anonymise, hash_keys, progress)
            if release_dir is not None:
                from deepssim.scanning.release import write_release

                self.release = write_release(
                    self,
                    release_dir,
                    drop=release_drop,
                    manifest=partial / "release.csv",
                    check=release_check,
                    progress=progress,
                )
                written["release"] = partial / "release.csv"
        self.files = {name: out_dir / path.relative_to(partial) for name, path in written.items()}
        return self.files

    def _write_outputs(
        self, folder: Path, report: bool, gallery_size: int, anonymise: bool, hash_keys: bool, progress: bool
    ) -> dict:
        """Write every output file into ``folder`` (a new, empty one); name -> path."""
        files = {
            "results": folder / "results.csv",
            "pairs": folder / "pairs.csv",
            "summary": folder / "summary.json",
        }
        write_text_atomic(files["results"], results_csv(self))
        write_text_atomic(files["pairs"], pairs_csv(self))
        write_text_atomic(files["summary"], self.summary.to_json())
        if self.groups is not None:
            files["groups"] = folder / "groups.csv"
            write_rows_atomic(
                files["groups"], self.groups, ["group", "training_images", "images_with_a_duplicate"]
            )
        if report:
            from deepssim.scanning.audit import key_hasher, new_salt
            from deepssim.scanning.evidence import gallery_pairs
            from deepssim.scanning.report import write_report

            name = None
            if hash_keys:
                salt = new_salt()
                files["salt"] = folder / "key-salt.txt"
                write_text_atomic(files["salt"], salt + "\n")
                name = key_hasher(salt)
            files["report"] = folder / "report.html"
            gallery = gallery_pairs(self, gallery_size, progress, anonymise)
            write_report(self, files["report"], gallery, anonymise, name)
        return files


def scan(
    train,
    generated,
    *,
    settings: ScanSettings | None = None,
    model: str | Path | DeepSSIM = "default",
    metric: str | SimilarityMetric = "deepssim",
    thresholds: Thresholds | tuple[float | None, float | None] | None = None,
    reference=None,
    options: LoadOptions | None = None,
    cache: str | Path | None | bool = True,
    engine: str | ScanEngine | None = None,
    progress: bool = False,
    **shortcuts,
) -> ScanResult:
    """Scan generated images against training images for memorised copies.

    train, generated, reference: folders, files or :class:`ImageSet`s.
    settings: how to scan (:class:`ScanSettings`: decision, k, search, grouping, label-free
    thresholds, precision, device, engine); ``shortcuts`` set any of its fields by keyword
    (``scan(train, generated, k=10)``), over ``settings``.
    model: the DeepSSIM model ("default", a checkpoint or a TorchScript file).
    metric: "deepssim" (with ``model``), "ssim" (exact; one shared image size), an embedding
    baseline spec such as "sscd=FILE" (see :mod:`deepssim.metrics`), or a metric object.
    thresholds: default the decision score's published ones (0.6 / 0.85); a (low, high) tuple may
    leave either as None to take the default.
    reference: held-out real images of other patients (Dar et al.'s reference distribution).
    cache: True for the default cache file, a path, or False/None for none.
    engine: an engine object with its options (e.g. :class:`deepssim.execution.ray_engine.RayEngine`);
    by default the one ``settings.engine`` names. The decisions and outputs are the same either way.

    The stages: index -> embed -> retrieve -> thresholds -> register -> decide -> summarise; the
    report is rendered by :meth:`ScanResult.save`.
    """
    if isinstance(engine, str):
        shortcuts["engine"], engine = engine, None
    if engine is not None:
        shortcuts["engine"] = engine.name
    settings = replace(settings or ScanSettings(), **shortcuts)
    if settings.use_reference_threshold and reference is None:
        raise DeepSSIMError("the reference threshold needs reference images (--reference DIR)")
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        check_threshold_values(*thresholds)  # before any work
    started = time.perf_counter()
    stages: dict[str, float] = {}  # seconds per stage, for summary.json and the benchmarks
    lap = _stopwatch(stages)
    precision = resolve_precision(settings.precision, settings.device)
    if not isinstance(metric, SimilarityMetric):
        metric = load_metric(metric, settings.device, default_model=model)
    two_stage = settings.decision == "two-stage"
    score = REGISTERED_SSIM if two_stage else metric.name  # the score the classes come from

    train_set = ImageSet.coerce(train, options, progress, "indexing training images")
    generated_set = ImageSet.coerce(generated, options, progress, "indexing generated images")
    reference_set = (
        ImageSet.coerce(reference, options, progress, "indexing reference images") if reference else None
    )
    if two_stage or settings.verify:
        _check_one_size(train_set, generated_set, "--decision score" if two_stage else "no --verify")
    fingerprint = metric.fingerprint.split(":")[-1]  # may hash a weights file: once
    model_fingerprint = fingerprint if metric.is_embedding and not two_stage else None
    thresholds = resolve_thresholds(
        thresholds, score, train_set.shape, metric, model_fingerprint, settings.use_reference_threshold
    )
    # every key must name its patient before any work
    groups = group_of_each_image(train_set, settings.group_by) if settings.group_by else None
    lap("index")

    engine = engine or get_engine(settings.engine)
    embed = None
    if metric.is_embedding:
        embed = engine.embedder(
            metric, cache=cache, batch_size=settings.batch_size, precision=precision, progress=progress
        )
    try:
        if embed is not None:
            embed.prepare({"training": train_set, "generated": generated_set})
            lap("embed")
        search = {"search": settings.search, "embed": embed, "engine": engine, "progress": progress}
        scores, neighbours, best_per_train = retrieve(metric, train_set, generated_set, settings.k, **search)
        lap("search")
        if settings.exact_candidates:
            scores, neighbours = _with_exact_candidates(
                metric,
                train_set,
                generated_set,
                scores,
                neighbours,
                settings.exact_candidates,
                embed,
                progress,
            )
            lap("exact candidates")
        reference_scores = None
        if reference_set is not None and two_stage:  # registered SSIM against the nearest other patients
            _, nearest, _ = retrieve(metric, reference_set, train_set, settings.k, **search)
            registered = register_top_k(
                reference_set, train_set, nearest, progress=progress, engine=engine, device=settings.device
            )
            reference_scores = np.nanmax(registered.ssim_registered, axis=1)
        elif reference_set is not None:  # each training image's best score against other patients
            reference_scores = retrieve(metric, train_set, reference_set, 1, **search)[2]
        null_scores = None
        if settings.duplicate_fpr is not None or settings.reidentify:
            null_scores = _different_patient_scores(
                metric, train_set, groups, settings.k, two_stage, embed, engine, progress, settings.device
            )
        lap("references")
    finally:
        if hasattr(embed, "close"):
            embed.close()
    thresholds = _label_free_thresholds(thresholds, settings, null_scores, groups, reference_scores)

    if two_stage or settings.verify:
        mode = settings.registration if two_stage else "full"
        evidence = register_top_k(
            train_set,
            generated_set,
            neighbours,
            progress=progress,
            engine=engine,
            mode=mode,
            thresholds=thresholds,
            device=settings.device,
        )
    else:  # the evidence of every Duplicate, always
        duplicates = scores > thresholds.high
        evidence = register_top_k(
            train_set, generated_set, neighbours, duplicates, progress, engine=engine, device=settings.device
        )
    lap("register")

    decided = evidence.ssim_registered if two_stage else scores
    order, classes = decide(decided, thresholds)
    scores = np.take_along_axis(scores, order, axis=1)
    neighbours = np.take_along_axis(neighbours, order, axis=1)
    evidence = evidence.reordered(order)
    decided = evidence.ssim_registered if two_stage else scores
    best_other = best_other_scores(decided, neighbours, groups)
    reidentifies = (
        reidentified(decided[:, 0], neighbours[:, 0], groups, null_scores) if settings.reidentify else None
    )
    if two_stage:  # each training image's best registered SSIM over the generated images' top k
        best_per_train = np.full(len(train_set), -np.inf, dtype=np.float64)
        np.maximum.at(best_per_train, neighbours.ravel(), evidence.ssim_registered.ravel())
    lap("decide")

    model_name = getattr(metric, "source", metric.description)
    summary = summarise(
        metric=metric.name,
        model=model_name,
        train_set=train_set,
        generated_set=generated_set,
        decided=decided,
        classes=classes,
        best_per_train=best_per_train,
        thresholds=thresholds,
        reference_scores=reference_scores,
        search=settings.search,
        decision=f"two-stage: {metric.name} retrieves the top {min(settings.k, len(train_set))}"
        + (f" (+ {scores.shape[1] - settings.k} by exact SSIM)" if scores.shape[1] > settings.k else "")
        + ", registered SSIM decides"
        if two_stage
        else f"score: {metric.name} decides",
        precision=precision,
        copies_counted_until_first=two_stage and settings.registration == "cascade",
    )
    group_rows = None
    if groups is not None:
        with_duplicate, group_rows = group_summary(groups, best_per_train > thresholds.high)
        summary.groups = {
            "by": settings.group_by,
            "groups": len(group_rows),
            "with_a_duplicate": with_duplicate,
        }
    if reidentifies is not None:
        codes = np.asarray(groups)[neighbours[reidentifies, 0]]
        summary.reidentification = {
            "description": "generated images whose best decision score exceeds every score another "
            "patient's training image reaches against that patient",
            "generated_images": share(int(reidentifies.sum()), len(reidentifies)),
            "patients": int(len(set(codes.tolist()))),
        }
    if null_scores is not None:
        summary.different_patient_scores = {
            "description": "each training image's best score against the training images of other groups",
            "training_images": int(len(null_scores)),
            "best_score_percentiles": percentiles(null_scores, (50, 95, 99)),
            "requested_fpr": settings.duplicate_fpr,
        }
    inputs = {"training": train_set, "generated": generated_set}
    if reference_set is not None:
        inputs["reference"] = reference_set
    summary.audit = audit_trail(
        inputs,
        {"training": train, "generated": generated, "reference": reference},
        {
            "metric": metric.name,
            "name": model_name,
            "fingerprint_sha256": fingerprint,
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
    lap("summarise")
    summary.seconds = round(time.perf_counter() - started, 2)
    summary.seconds_by_stage = {name: round(value, 2) for name, value in stages.items() if value > 0}
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
        decision=settings.decision,
        embedder=getattr(metric, "model", None),
        groups=group_rows,
        reference_scores=reference_scores,
        best_per_training_image=best_per_train,
        best_other_scores=best_other,
        reidentifies=reidentifies,
    )


def _with_exact_candidates(metric, train_set, generated_set, scores, neighbours, n, embed, progress):
    """The retrieved (scores, neighbours) with each generated image's n best training images by
    exact SSIM appended (those not retrieved already), scored by the metric (their cosine)."""
    if not metric.is_embedding:
        raise DeepSSIMError(
            f"--exact-candidates adds exact-SSIM candidates to an embedding's retrieval; {metric.name} "
            "already searches every pair"
        )
    extra = exact_candidates(train_set, generated_set, neighbours, n, progress)
    if extra.shape[1] == 0:
        return scores, neighbours
    generated_vectors, train_vectors = embed(generated_set, "generated"), embed(train_set, "training")
    extra_scores = np.einsum("md,mkd->mk", generated_vectors, train_vectors[extra]).astype(scores.dtype)
    return np.concatenate([scores, extra_scores], axis=1), np.concatenate([neighbours, extra], axis=1)


def best_other_scores(decided: np.ndarray, neighbours: np.ndarray, groups: list[str] | None) -> np.ndarray:
    """Per row, the best decision score among the pairs whose training image is not of the best
    pair's group (or, without groups, is not the best pair's image); NaN where there is none."""
    owner = np.unique(np.asarray(groups), return_inverse=True)[1] if groups is not None else None
    labels = owner[neighbours] if owner is not None else neighbours
    other = labels != labels[:, :1]
    values = np.where(other, np.nan_to_num(decided, nan=-np.inf), -np.inf).max(axis=1, initial=-np.inf)
    return np.where(np.isfinite(values), values, np.nan)


def reidentified(best_scores, best_neighbours, groups: list[str], null_scores) -> np.ndarray:
    """Per generated image: does its best decision score beat every different-patient score of its
    best match's patient? ``null_scores`` (N,): each training image's best score against the
    training images of other groups."""
    codes = np.unique(np.asarray(groups), return_inverse=True)[1]
    ceiling = np.full(codes.max() + 1, -np.inf)
    np.maximum.at(ceiling, codes, np.nan_to_num(np.asarray(null_scores, dtype=np.float64), nan=-np.inf))
    return np.asarray(best_scores) > ceiling[codes[best_neighbours]]


def _label_free_thresholds(thresholds, settings: ScanSettings, null_scores, groups, reference_scores):
    """The thresholds stage. ``--duplicate-fpr``: the different-patient null sets the
    Different/Similar boundary and is a floor under the Duplicate threshold, never lowering it
    below what a copy means (a neighbouring slice of the same patient passes the null easily).
    ``--reference-threshold``: Dar et al.'s rule replaces the Duplicate threshold."""
    if settings.duplicate_fpr is not None and not settings.use_reference_threshold:
        null = conformal_threshold(null_scores, settings.duplicate_fpr)
        high = max(thresholds.high, null)
        low = min(max(thresholds.low, null), high)
        source = f"fpr {settings.duplicate_fpr:g} from {len(set(groups))} training groups"
        source += f", over {thresholds.source}"
        thresholds = replace(thresholds, low=low, high=high, source=source)
    if settings.use_reference_threshold:
        high = reference_threshold(reference_scores)
        low = high if thresholds is None else min(thresholds.low, high)
        thresholds = Thresholds(low, high, f"reference p{REFERENCE_PERCENTILE:g}")
    return thresholds


def resolve_thresholds(
    given, score: str, image_shape, metric: SimilarityMetric, model_fingerprint, use_reference_threshold: bool
) -> Thresholds | None:
    """The thresholds of ``score``: a calibrated file (checked against the score, model and image
    size it was made for), or (low, high) where either may be None and takes the score's default."""
    if isinstance(given, Thresholds):
        given.check_for(score, image_shape, model_fingerprint)
        return given
    low, high = given if given is not None else (None, None)
    defaults = default_thresholds(score, image_shape, metric.thresholds)
    if defaults is None and (low is None or (high is None and not use_reference_threshold)):
        raise DeepSSIMError(
            f"{metric.name} has no published thresholds: pass --low and --high, "
            "or --thresholds from `deepssim calibrate`"
        )
    if low is None and high is None:
        return defaults
    if defaults is not None:
        low = defaults.low if low is None else low
        high = defaults.high if high is None else high
    if high is None:  # only the reference rule will set it
        return None
    return Thresholds(low, high, "set", score=score)


def _stopwatch(stages: dict[str, float]):
    """``lap(name)`` adds the seconds since the previous lap to ``stages[name]``."""
    last = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        stages[name] = stages.get(name, 0.0) + now - last[0]
        last[0] = now

    return lap


def _different_patient_scores(
    metric, train_set, groups, k, two_stage, embed, engine, progress, device
) -> np.ndarray:
    """Each training image's best decision score against the training images of other groups."""
    if not metric.is_embedding:
        raise DeepSSIMError(
            "--duplicate-fpr and --reidentify retrieve with an embedding metric; use --metric deepssim "
            "(the default)"
        )
    scores, nearest = top_k_other_groups(embed(train_set, "training"), groups, k)
    if not two_stage:
        return scores[:, 0].astype(np.float64)
    evidence = register_top_k(train_set, train_set, nearest, progress=progress, engine=engine, device=device)
    return np.nanmax(evidence.ssim_registered, axis=1)


def _input_locations(audit: dict | None) -> list[str]:
    """The input files and folders a scan read (from its audit trail), for the output checks."""
    if not audit:
        return []
    return [path for record in audit["inputs"].values() for path in record.get("absolute", [])]


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
