"""``deepssim scan``, ``calibrate`` and ``ssim-matrix``: thin layers over the scanning API."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from deepssim.cli.options import (
    add_engine_options,
    add_loading_options,
    add_model_options,
    add_progress_option,
    add_settings_options,
    add_threshold_options,
    engine_from_args,
    loading_options,
    npz_output,
    settings_from_args,
    thresholds_from_args,
)
from deepssim.errors import DeepSSIMError
from deepssim.io.files import check_output_folder, check_writable
from deepssim.labels import PAPER_THRESHOLDS
from deepssim.scanning.decide import REGISTERED_SSIM
from deepssim.scanning.settings import ScanSettings
from deepssim.settings import whole_number

METRIC_HELP = (
    "deepssim (default), ssim, registered (pairs only), fsim (pairs only), or an embedding baseline: "
    "sscd=FILE, dar=FILE, semdedup=ARCH:FILE"
)
# Above this many bytes the SSIM matrix is kept in a memory-mapped file instead of RAM.
IN_MEMORY_MATRIX_BYTES = 2**30


def add_commands(commands) -> None:
    _add_scan(commands)
    _add_calibrate(commands)
    _add_ssim_matrix(commands)
    _add_dedup(commands)


def _add_scan(commands) -> None:
    scan = commands.add_parser(
        "scan",
        help="find memorised copies of training images among generated images",
        description="For every generated image: its nearest training images, scores and class "
        "(Different / Similar / Duplicate); writes results.csv, pairs.csv, summary.json and report.html.",
    )
    scan.add_argument("--train", required=True, nargs="+", help="training images: folders or files")
    scan.add_argument("--generated", required=True, nargs="+", help="generated images: folders or files")
    scan.add_argument(
        "--out",
        default="deepssim-scan",
        help="output folder (default deepssim-scan); written whole under a temporary name, then renamed",
    )
    scan.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing non-empty --out folder whole (otherwise it is refused)",
    )
    scan.add_argument("--metric", default="deepssim", help=METRIC_HELP)
    scan.add_argument(
        "--unit",
        choices=("image", "volume"),
        default="image",
        help="image (default): every 2D image or slice is compared; volume: every generated NIfTI volume "
        "is compared whole with the training volumes (3D registered SSIM; slices along --plane vote)",
    )
    scan.add_argument(
        "--volume-retrieval",
        choices=("votes", "pooled"),
        default="votes",
        help="with --unit volume: how candidate training volumes are found (default votes of slice "
        "neighbours)",
    )
    scan.add_argument(
        "--min-slab",
        type=whole_number(1),
        default=5,
        help="with --unit volume: consecutive slices above the high threshold that make a copied slab "
        "(default 5)",
    )
    add_settings_options(scan, ScanSettings)
    add_threshold_options(scan)
    scan.add_argument(
        "--reference", nargs="+", help="held-out real images: the similarity of different patients"
    )
    scan.add_argument("--cache", help="embedding cache file (default ~/.cache/deepssim/embeddings.sqlite)")
    scan.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    scan.add_argument(
        "--gallery", type=whole_number(0), default=24, help="pairs shown in report.html (default 24)"
    )
    scan.add_argument(
        "--anonymise",
        action="store_true",
        help="a report to share outside the hospital: no image of anyone and no absolute path; keys, "
        "scores and, for Duplicates, an 8x8 grid of mean differences",
    )
    scan.add_argument(
        "--hash-keys",
        action="store_true",
        help="with --anonymise: show every key and patient ID as a salted SHA-256 hash (the salt stays in "
        "OUT/key-salt.txt, not to share)",
    )
    add_progress_option(scan)
    scan.add_argument(
        "--fit-model",
        action="store_true",
        help="first fit the model to the training images (deepssim fit, cached), then scan with it",
    )
    scan.add_argument(
        "--fit-minutes", type=float, default=10.0, help="time budget of --fit-model (default 10)"
    )
    scan.add_argument(
        "--release-dir",
        help="also copy the generated images that pass (no Duplicate) into this new folder, with "
        "release.csv (generated keys and classes) and release.json: a set ready to share; the manifest "
        "naming training images goes to OUT/release.csv",
    )
    scan.add_argument(
        "--release-drop",
        choices=("similar",),
        help="with --release-dir: also drop the images called Similar",
    )
    scan.add_argument(
        "--release-check",
        choices=("exact", "none"),
        default="exact",
        help="with --release-dir: exact (default) first compares every image to be released with every "
        "training image by exact SSIM (in 4 flips) and registers its best 5, so a copy the retriever "
        "ranked below the top k is not released; none: the scan's classes only",
    )
    add_model_options(scan, device=False)
    add_loading_options(scan)
    add_engine_options(scan, with_choice=False)
    scan.set_defaults(handler=_run_scan)


# options of the image scan that the volume scan does not take: (attribute, its default, the flag)
_IMAGE_ONLY = (
    ("metric", "deepssim", "--metric"),
    ("decision", "two-stage", "--decision"),
    ("release_dir", None, "--release-dir"),
    ("anonymise", False, "--anonymise"),
    ("reference", None, "--reference"),
    ("fit_model", False, "--fit-model"),
    ("size", None, "--size"),
    ("axis", None, "--axis"),
    ("slices", None, "--slices"),
    ("duplicate_fpr", None, "--duplicate-fpr"),
    ("reidentify", False, "--reidentify"),
    ("engine", "local", "--engine"),
)


def _run_volume_scan(args: argparse.Namespace) -> None:
    from deepssim.scanning.volumes import VolumeScanSettings, scan_volumes

    for attribute, default, flag in _IMAGE_ONLY:
        if getattr(args, attribute, default) != default:
            raise DeepSSIMError(f"{flag} is for the image scan; --unit volume does not take it")
    thresholds = thresholds_from_args(args)
    out = Path(args.out)
    check_output_folder(out, overwrite=args.overwrite, inputs=[*args.train, *args.generated])
    settings = VolumeScanSettings(
        k=args.k,
        plane=args.plane,
        retrieval=args.volume_retrieval,
        min_slab=args.min_slab,
        group_by=args.group_by,
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device,
    )
    result = scan_volumes(
        args.train,
        args.generated,
        settings=settings,
        model=args.model,
        thresholds=thresholds,
        spacing=args.spacing,
        progress=not args.no_progress,
    )
    files = result.save(out, overwrite=args.overwrite)
    print(result.text())
    print(f"report: {files['report']}")
    names = ("results", "pairs", "slices", "groups", "summary")
    print(f"tables: {', '.join(str(files[n]) for n in names if n in files)}")


def _run_scan(args: argparse.Namespace) -> None:
    from deepssim.scanning.scan import scan

    if args.unit == "volume":
        return _run_volume_scan(args)
    # every option is checked before any work: nothing is read, computed or written before this
    if args.release_drop and not args.release_dir:
        raise DeepSSIMError("--release-drop needs --release-dir")
    if args.hash_keys and not args.anonymise:
        raise DeepSSIMError("--hash-keys hashes the keys of the anonymised report: add --anonymise")
    settings = settings_from_args(ScanSettings, args)
    thresholds = thresholds_from_args(args)
    options = loading_options(args)
    out = Path(args.out)
    engine = engine_from_args(args, out.parent / f"{out.name}.embeddings-parquet")
    inputs = [*args.train, *args.generated, *(args.reference or [])]
    outputs = [("--out", out)] + ([("--release-dir", Path(args.release_dir))] if args.release_dir else [])
    check_output_folder(out, overwrite=args.overwrite, inputs=inputs, others=outputs[1:])
    if args.release_dir:
        if Path(args.release_dir).exists():
            raise DeepSSIMError(
                f"--release-dir {args.release_dir} already exists; a release goes into a new folder"
            )
        check_output_folder(args.release_dir, inputs=inputs, option="--release-dir")
    if args.cache and not args.no_cache:
        cache = Path(args.cache).resolve()
        for option, folder in outputs:
            if cache.is_relative_to(folder.resolve()):
                raise DeepSSIMError(
                    f"--cache {args.cache} is inside {option} {folder}, which is written whole at the end of "
                    "the scan: keep the embedding cache elsewhere"
                )
    fit_settings = None
    if args.fit_model:
        from deepssim.training.fit import FitSettings

        fit_settings = FitSettings(start=args.model, minutes=args.fit_minutes, device=settings.device)
    model, fitted = args.model, None
    if fit_settings is not None:
        from deepssim.training.fit import cached_fit, describe

        fitted = cached_fit(
            args.train,
            generated=args.generated,
            settings=fit_settings,
            options=options,
            progress=not args.no_progress,
        )
        print(describe(fitted))
        model = str(fitted.model_path)
    result = scan(
        args.train,
        args.generated,
        settings=settings,
        model=model,
        metric=args.metric,
        thresholds=thresholds,
        reference=args.reference,
        options=options,
        cache=False if args.no_cache else (args.cache or True),
        engine=engine,
        progress=not args.no_progress,
    )
    if fitted is not None:
        result.summary.fit = fitted.report
    drop = ("Duplicate", "Similar") if args.release_drop == "similar" else ("Duplicate",)
    files = result.save(
        out,
        gallery_size=args.gallery,
        anonymise=args.anonymise,
        hash_keys=args.hash_keys,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        release_dir=args.release_dir,
        release_drop=drop,
        release_check=args.release_check,
    )
    print(result.summary.text())
    if args.release_dir:
        release = result.release
        print(
            f"release: {release['released_images']} of {release['generated_images']} generated images "
            f"({release['released_files']} files) -> {args.release_dir} (dropped: {', '.join(drop)}; "
            f"{files['release']} says why)"
        )
        if release["exact_check"] is not None:
            check = release["exact_check"]
            print(
                f"release exact check: {check['images_checked']} images against every training image, "
                f"{check['images_dropped']} more dropped ({check['seconds']:.1f} s)"
            )
    print(f"report: {files['report']}")
    tables = [files[name] for name in ("results", "pairs", "groups", "summary") if name in files]
    print(f"tables: {', '.join(str(path) for path in tables)}")
    if "salt" in files:
        print(f"key salt: {files['salt']} (keep it here: with it the hashed keys can be mapped back)")


def _add_calibrate(commands) -> None:
    calibrate = commands.add_parser(
        "calibrate",
        help="fit low/high thresholds to labelled pairs",
        description="Find the low/high thresholds that maximise macro-F1 on labelled pairs "
        "(CSV: train_key, generated_key, label: Different, Similar or Duplicate).",
    )
    source = calibrate.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", help="labelled pairs CSV")
    source.add_argument(
        "--labels", help="a deepssim label folder: its majority labels, images from its scan's inputs"
    )
    calibrate.add_argument("--train", nargs="+", help="training images (with --labels: the scan's)")
    calibrate.add_argument("--generated", nargs="+", help="generated images (with --labels: the scan's)")
    calibrate.add_argument(
        "--metric",
        default="registered",
        help="the score to calibrate: registered (default; registered SSIM, what the default two-stage "
        "scan decides with), or a metric for scan --decision score: " + METRIC_HELP,
    )
    calibrate.add_argument(
        "--bootstrap", type=int, default=200, help="resamples for the thresholds' 95%% intervals (0: none)"
    )
    calibrate.add_argument("--out", default="thresholds.json", help="thresholds file to write")
    add_progress_option(calibrate)
    add_model_options(calibrate)
    add_loading_options(calibrate)
    calibrate.set_defaults(handler=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> None:
    from deepssim.evaluation.protocol import calibrate_thresholds

    if Path(args.out).is_dir():
        raise DeepSSIMError(
            f"--out {args.out} is a folder; name the thresholds file to write (e.g. thresholds.json)"
        )
    check_writable(args.out)
    if args.pairs and not Path(args.pairs).is_file():
        raise DeepSSIMError(f"--pairs {args.pairs}: no such file")
    if args.labels and not Path(args.labels).is_dir():
        raise DeepSSIMError(f"--labels {args.labels}: no such folder (a deepssim label --out folder)")
    pairs, train, generated, options = args.pairs, args.train, args.generated, loading_options(args)
    if args.labels:
        from deepssim.labelling import LabelStore, ScanPairs, summarise

        report = summarise(args.labels)
        scan = ScanPairs.read(LabelStore.open(args.labels).meta()["scan"])
        pairs = Path(args.labels) / "labelled.csv"
        train = train or scan.inputs["training"]
        generated = generated or scan.inputs["generated"]
        options = scan.options
        print(f"{report.majority_pairs} majority labels from {len(report.raters)} rater(s) -> {pairs}")
    elif not (train and generated):
        raise DeepSSIMError("--pairs needs --train and --generated (the images the keys name)")
    calibration = calibrate_thresholds(
        pairs,
        train,
        generated,
        metric=args.metric,
        model=args.model,
        options=options,
        device=args.device,
        progress=not args.no_progress,
        out=args.out,
        bootstrap=args.bootstrap,
    )
    thresholds = calibration.thresholds
    print(
        f"thresholds for {thresholds.score}: low {thresholds.low:.4f}, high {thresholds.high:.4f} "
        f"(macro-F1 {calibration.macro_f1:.3f} on {calibration.pairs} labelled pairs: "
        + ", ".join(f"{name} {count}" for name, count in calibration.pairs_by_class.items())
        + f") -> {args.out}"
    )
    if calibration.intervals:
        low, high = calibration.intervals["low_ci95"], calibration.intervals["high_ci95"]
        print(
            f"  95% bootstrap intervals: low {low[0]:.4f} - {low[1]:.4f}, high {high[0]:.4f} - {high[1]:.4f}"
        )
    command = [
        "deepssim scan --train",
        *map(str, _as_list(train)),
        "--generated",
        *map(str, _as_list(generated)),
    ]
    if thresholds.score != REGISTERED_SSIM:
        command += ["--decision score --metric", args.metric]
    print(f"use them with: {' '.join(command)} --thresholds {args.out}")


def _as_list(value) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def _add_ssim_matrix(commands) -> None:
    matrix = commands.add_parser(
        "ssim-matrix",
        help="SSIM of every (train, generated) pair, saved as .npz",
        description="Compute the exact SSIM (the paper's label) of every (train, generated) pair.",
    )
    matrix.add_argument("--train", required=True, nargs="+", help="folder(s) or files of training images")
    matrix.add_argument(
        "--generated", required=True, nargs="+", help="folder(s) or files of generated images"
    )
    matrix.add_argument("--out", required=True, help="output .npz (matrix, keys, settings)")
    matrix.add_argument(
        "--top-k",
        type=whole_number(0),
        default=0,
        help="also write OUT.topK.csv with the K most similar training images per generated image",
    )
    matrix.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    matrix.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    matrix.add_argument(
        "--block-size", type=whole_number(1), default=2048, help="images per block (memory; default 2048)"
    )
    add_progress_option(matrix)
    add_loading_options(matrix)
    add_engine_options(matrix)
    matrix.set_defaults(handler=_run_ssim_matrix)


def _run_ssim_matrix(args: argparse.Namespace) -> None:
    from deepssim.io.load import ImageSet
    from deepssim.ssim.matrix import compute_ssim_matrix

    out = npz_output(args.out)
    if out.is_dir():
        raise DeepSSIMError(f"--out {out} is a folder; name the .npz file to write")
    check_writable(out)
    options = loading_options(args)
    progress = not args.no_progress
    train = ImageSet.from_paths(args.train, options, progress, "indexing training images")
    generated = ImageSet.from_paths(args.generated, options, progress, "indexing generated images")
    matrix_bytes = len(train) * len(generated) * np.dtype(args.dtype).itemsize
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".deepssim-") as scratch:
        matrix_file = Path(scratch) / "ssim.npy" if matrix_bytes > IN_MEMORY_MATRIX_BYTES else None
        result = compute_ssim_matrix(
            train,
            generated,
            dtype=args.dtype,
            device=args.device,
            block_size=args.block_size,
            progress=progress,
            matrix_file=matrix_file,
            engine=engine_from_args(args),
        )
        result.save(out)
        if args.top_k:
            top_k_path = out.with_suffix(f".top{args.top_k}.csv")
            result.save_top_k(top_k_path, args.top_k)
        values = np.asarray(result.values)
        print(
            f"SSIM matrix: {len(train)} training x {len(generated)} generated images "
            f"of {train.shape[0]}x{train.shape[1]} -> {out}"
        )
        print(f"  SSIM min {values.min():.4f}  median {np.median(values):.4f}  max {values.max():.4f}")
        best = values.max(axis=0)
        high = PAPER_THRESHOLDS[1]
        print(
            f"  generated images whose best train match has SSIM > {high}: "
            f"{int((best > high).sum())} of {len(best)}"
        )
        if args.top_k:
            print(f"  top-{args.top_k} matches -> {top_k_path}")


def _add_dedup(commands) -> None:
    dedup = commands.add_parser(
        "dedup",
        help="group near-duplicate images within one training set, keep one per group",
        description="Before training a generator: find the near-duplicates of one training set with the "
        "scan's decision (DeepSSIM retrieves each image's k most similar other images, registered SSIM "
        "decides) and keep one image per group. Writes OUT/groups.csv and OUT/kept.txt; files are "
        "never moved.",
    )
    dedup.add_argument("--train", required=True, nargs="+", help="the training images: folders or files")
    dedup.add_argument("--out", required=True, help="output folder (groups.csv, kept.txt)")
    dedup.add_argument(
        "-k", "--top-k", type=whole_number(1), default=5, help="candidates registered per image (default 5)"
    )
    dedup.add_argument(
        "--high",
        type=float,
        help="registered SSIM above which two images are duplicates (default: the scan's Duplicate "
        "threshold for the images' size)",
    )
    add_progress_option(dedup)
    add_model_options(dedup, device=False)
    add_loading_options(dedup)
    dedup.set_defaults(handler=_run_dedup)


def _run_dedup(args: argparse.Namespace) -> None:
    from deepssim.scanning.decide import check_threshold_values
    from deepssim.scanning.dedup import deduplicate

    check_threshold_values(None, args.high)
    check_output_folder(args.out, inputs=args.train, overwrite=False)
    result = deduplicate(
        args.train,
        out_dir=args.out,
        model=args.model,
        k=args.top_k,
        threshold=args.high,
        options=loading_options(args),
        progress=not args.no_progress,
    )
    print(
        f"{len(result.keys)} training images: {len(result.groups)} groups of near-duplicates "
        f"(registered SSIM > {result.threshold:.4g}); keep {len(result.kept)}, drop {result.removed}"
    )
    print(f"groups: {Path(args.out) / 'groups.csv'}; images to keep: {Path(args.out) / 'kept.txt'}")
