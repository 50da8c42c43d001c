"""The ``deepssim`` command: a thin layer that parses options and calls the Python API."""

from __future__ import annotations

import argparse
import getpass
import sys
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.hardware import PRECISIONS
from deepssim.io.load import LoadOptions
from deepssim.io.normalise import FIT_MODES, parse_size

# Above this many bytes the matrix is kept in a memory-mapped file instead of RAM.
IN_MEMORY_MATRIX_BYTES = 2**30


def _slice_range(text: str) -> tuple[int | None, int | None]:
    try:
        start, stop = text.split(":")
        return (int(start) if start else None, int(stop) if stop else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP (e.g. 20:120), got {text!r}") from None


def _add_loading_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reading images")
    group.add_argument("--size", type=str, help="bring every image to HxW (e.g. 136x112)")
    group.add_argument(
        "--fit",
        choices=FIT_MODES,
        default="pad",
        help="how --size is applied: centre pad/crop (default) or bilinear resize",
    )
    group.add_argument(
        "--axis", type=int, default=2, choices=(0, 1, 2), help="NIfTI axis to slice along (default 2)"
    )
    group.add_argument("--slices", type=_slice_range, help="keep volume slices START:STOP")
    group.add_argument(
        "--min-foreground",
        type=float,
        default=0.05,
        help="skip volume slices with less foreground than this fraction (default 0.05; 0 keeps all)",
    )
    group.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable, constant or non-finite images with a warning",
    )


def _loading_options(args: argparse.Namespace) -> LoadOptions:
    return LoadOptions(
        axis=args.axis,
        slice_range=args.slices,
        min_foreground=args.min_foreground,
        size=parse_size(args.size) if args.size else None,
        fit=args.fit,
        skip_bad=args.skip_bad,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepssim",
        description="Find memorised copies of training images among generated images.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

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
        type=int,
        default=0,
        help="also write OUT.topK.csv with the K most similar training images per generated image",
    )
    matrix.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    matrix.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    matrix.add_argument("--block-size", type=int, default=2048, help="images per block (memory)")
    matrix.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_loading_options(matrix)
    _add_engine_options(matrix, shards=False)
    matrix.set_defaults(handler=_run_ssim_matrix)
    _add_scan_parser(commands)
    _add_calibrate_parser(commands)
    _add_label_parser(commands)
    _add_evaluate_parser(commands)
    _add_benchmark_parser(commands)
    _add_train_parser(commands)
    _add_fit_parser(commands)
    _add_train_dar_parser(commands)
    _add_embed_parser(commands)
    _add_export_parser(commands)
    _add_ldm_parser(commands)
    return parser


def _add_ldm_parser(commands) -> None:
    from deepssim.experiments.ldm import CONFIGS, DUPLICATION_EXTRA

    ldm = commands.add_parser(
        "ldm", help="the case study: a memorisation-prone latent diffusion model (MONAI)"
    )
    actions = ldm.add_subparsers(dest="action", required=True)
    vae = actions.add_parser("train-vae", help="train (or resume) the autoencoder of a run")
    vae.add_argument("--images", required=True, nargs="+", help="training images")
    vae.add_argument("--run", required=True, help="run folder")
    vae.add_argument("--config", choices=list(CONFIGS), default="small", help="small (CPU) or paper (GPU)")
    vae.add_argument("--duplication", choices=list(DUPLICATION_EXTRA), default="none")
    vae.add_argument("--conditions", help="CSV: key + numeric per-image variables to condition on")
    vae.add_argument("--epochs", type=int, help="autoencoder epochs (default: the configuration's)")
    vae.add_argument("--seed", type=int, default=0)
    diffusion = actions.add_parser("train-diffusion", help="train (or resume) the diffusion UNet of a run")
    diffusion.add_argument("--images", required=True, nargs="+", help="the same training images")
    diffusion.add_argument("--run", required=True)
    diffusion.add_argument("--epochs", type=int, help="diffusion epochs (default: the configuration's)")
    diffusion.add_argument(
        "--monitor-every",
        type=int,
        help="every N steps, sample a few images and scan them against the training images "
        "(DeepSSIM retrieves, registered SSIM decides); log to RUN/memorisation.csv",
    )
    diffusion.add_argument("--monitor-samples", type=int, default=16, help="images per check (default 16)")
    diffusion.add_argument(
        "--monitor-stop-share", type=float, help="stop training once this share of samples are Duplicates"
    )
    generate = actions.add_parser("generate", help="sample images from a trained run (DDIM)")
    generate.add_argument("--run", required=True)
    generate.add_argument("--out", required=True, help="folder of generated PNGs (+ manifest.csv/json)")
    generate.add_argument("--per-image", type=int, default=30, help="generations per training image")
    generate.add_argument("--steps", type=int, help="DDIM steps (default 50)")
    generate.add_argument("--seed", type=int, default=0)
    for parser in (vae, diffusion, generate):
        parser.add_argument("--no-progress", action="store_true")
    for parser in (vae, diffusion):
        _add_loading_options(parser)
    vae.set_defaults(handler=_run_ldm_vae)
    diffusion.set_defaults(handler=_run_ldm_diffusion)
    generate.set_defaults(handler=_run_ldm_generate)


def _run_ldm_vae(args: argparse.Namespace) -> None:
    from deepssim.experiments.ldm import train_vae

    run = train_vae(
        args.images,
        args.run,
        args.config,
        args.duplication,
        args.conditions,
        args.seed,
        _loading_options(args),
        not args.no_progress,
        vae_epochs=args.epochs,
    )
    print(f"autoencoder trained -> {run / 'vae.safetensors'}; next: deepssim ldm train-diffusion --run {run}")


def _run_ldm_diffusion(args: argparse.Namespace) -> None:
    from deepssim.experiments.ldm import RunInfo, train_diffusion

    monitor = None
    if args.monitor_every:
        from deepssim.monitor import MemorisationMonitor

        size = RunInfo.load(Path(args.run)).config.image_size
        options = LoadOptions(**{**asdict(_loading_options(args)), "size": size, "fit": "resize"})
        monitor = MemorisationMonitor(
            args.images,
            every=args.monitor_every,
            samples=args.monitor_samples,
            stop_share=args.monitor_stop_share,
            log=Path(args.run) / "memorisation.csv",
            options=options,
        )
    run = train_diffusion(
        args.images,
        args.run,
        options=_loading_options(args),
        progress=not args.no_progress,
        epochs=args.epochs,
        monitor=monitor,
    )
    if monitor is not None and monitor.records:
        last = monitor.records[-1]
        print(
            f"memorisation at step {last.step}: {last.duplicate_share:.0%} of {last.samples} samples are "
            f"Duplicates{' (stopped)' if last.stop else ''}; log: {Path(args.run) / 'memorisation.csv'}"
        )
    print(f"diffusion model trained -> {run / 'unet.safetensors'}; next: deepssim ldm generate --run {run}")


def _run_ldm_generate(args: argparse.Namespace) -> None:
    from deepssim.experiments.ldm import generate

    settings = generate(
        args.run, args.out, args.per_image, args.seed, args.steps, progress=not args.no_progress
    )
    print(
        f"{settings['images']} images -> {args.out} (manifest.csv, manifest.json); scan them with "
        f"deepssim scan --train TRAIN --generated {args.out}"
    )


def _add_scan_parser(commands) -> None:
    from deepssim.scanning.settings import ScanSettings

    defaults = ScanSettings()

    scan = commands.add_parser(
        "scan",
        help="find memorised copies of training images among generated images",
        description="For every generated image: its nearest training images, scores and class "
        "(Different / Similar / Duplicate); writes results.csv, pairs.csv, summary.json and report.html.",
    )
    scan.add_argument("--train", required=True, nargs="+", help="training images: folders or files")
    scan.add_argument("--generated", required=True, nargs="+", help="generated images: folders or files")
    scan.add_argument("--out", default="deepssim-scan", help="output folder (default deepssim-scan)")
    scan.add_argument(
        "--metric",
        default="deepssim",
        help="deepssim (default), ssim, or an embedding baseline: sscd=FILE, dar=FILE, semdedup=ARCH:FILE",
    )
    scan.add_argument(
        "--decision",
        choices=ScanSettings.choices("decision"),
        default=defaults.decision,
        help="two-stage (default): the metric retrieves the top-k, registered SSIM (after the best flip, "
        "rotation, shift and scale) decides; score: the metric's score decides (faster)",
    )
    scan.add_argument(
        "-k", "--top-k", type=int, default=defaults.k, help="training matches kept per generated image"
    )
    _add_threshold_options(scan)
    scan.add_argument(
        "--reference", nargs="+", help="held-out real images: the similarity of different patients"
    )
    scan.add_argument(
        "--reference-threshold",
        action="store_true",
        help="use the 95th percentile of the reference images' best scores as the high threshold",
    )
    scan.add_argument(
        "--group-by",
        help="group training images into patients: volume, folder, or a regex whose first group is the "
        "patient ID in each key (e.g. 'sub-(\\d+)'); adds groups.csv and a patient table",
    )
    scan.add_argument(
        "--duplicate-fpr",
        type=float,
        help="set the Duplicate threshold without labels: at most this share of different-patient "
        "matches (training images of other groups) are called Duplicate (needs --group-by)",
    )
    scan.add_argument(
        "--verify",
        action="store_true",
        help="with --decision score: also compute registered and plain SSIM of every top-k pair "
        "(always done for Duplicates, and for every pair in the two-stage decision)",
    )
    scan.add_argument(
        "--search",
        choices=ScanSettings.choices("search"),
        default=defaults.search,
        help="nearest-neighbour search",
    )
    scan.add_argument("--cache", help="embedding cache file (default ~/.cache/deepssim/embeddings.sqlite)")
    scan.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    scan.add_argument("--gallery", type=int, default=24, help="pairs shown in report.html (default 24)")
    scan.add_argument(
        "--anonymise",
        action="store_true",
        help="a report to share outside the hospital: no images, only keys, scores and maps of differences",
    )
    scan.add_argument("--batch-size", type=int, default=defaults.batch_size)
    scan.add_argument("--precision", choices=ScanSettings.choices("precision"), default=defaults.precision)
    scan.add_argument("--no-progress", action="store_true")
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
        "release.csv and release.json: a set ready to share",
    )
    scan.add_argument(
        "--release-drop",
        choices=("similar",),
        help="with --release-dir: also drop the images called Similar",
    )
    _add_model_options(scan)
    _add_loading_options(scan)
    _add_engine_options(scan, shards=True)
    scan.set_defaults(handler=_run_scan)


def _add_threshold_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("thresholds (default: the model's; paper 0.6 / 0.85)")
    group.add_argument("--low", type=float, help="scores at or below this are Different")
    group.add_argument("--high", type=float, help="scores above this are Duplicate")
    group.add_argument("--thresholds", help="a thresholds .json written by `deepssim calibrate`")


def _thresholds(args: argparse.Namespace):
    """A thresholds file, or (low, high) where either may be None (the metric's is used)."""
    from deepssim.scanning.decide import Thresholds

    if args.thresholds:
        if args.low is not None or args.high is not None:
            raise DeepSSIMError("give either --thresholds FILE or --low/--high, not both")
        return Thresholds.load(args.thresholds)
    return (args.low, args.high)


def _add_engine_options(parser: argparse.ArgumentParser, shards: bool) -> None:
    from deepssim.scanning.engines import ENGINES

    group = parser.add_argument_group("engine (where the work runs)")
    group.add_argument(
        "--engine",
        choices=list(ENGINES),
        default="local",
        help="local: this process (default); ray: a Ray cluster (pip install 'deepssim[ray]')",
    )
    group.add_argument(
        "--ray-address", help="a running Ray cluster (e.g. auto, ray://HEAD:10001); default: start one here"
    )
    group.add_argument("--workers", type=int, default=2, help="Ray actors / tasks in flight (default 2)")
    group.add_argument("--cpus-per-worker", type=float, default=1.0)
    group.add_argument("--gpus-per-worker", type=float, default=0.0)
    if shards:
        group.add_argument(
            "--shard-size", type=int, default=1024, help="images per Parquet embedding shard (default 1024)"
        )


def _engine(args: argparse.Namespace, shard_dir: Path | None = None):
    """The engine the flags ask for ("local" needs no object)."""
    if args.engine == "local":
        return "local"
    from deepssim.scanning.ray_engine import RayEngine

    return RayEngine(
        address=args.ray_address,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        shard_dir=shard_dir,
        shard_size=getattr(args, "shard_size", 1024),
    )


def _run_scan(args: argparse.Namespace) -> None:
    from deepssim.scanning.scan import scan

    if args.release_drop and not args.release_dir:
        raise DeepSSIMError("--release-drop needs --release-dir")
    if args.release_dir and Path(args.release_dir).exists():
        raise DeepSSIMError(
            f"--release-dir {args.release_dir} already exists; a release goes into a new folder"
        )

    model, fitted = args.model, None
    if args.fit_model:
        from deepssim.training.fit import FitSettings, cached_fit, describe

        fitted = cached_fit(
            args.train,
            generated=args.generated,
            settings=FitSettings(start=args.model, minutes=args.fit_minutes, device=args.device),
            options=_loading_options(args),
            progress=not args.no_progress,
        )
        print(describe(fitted))
        model = str(fitted.model_path)
    result = scan(
        args.train,
        args.generated,
        model=model,
        metric=args.metric,
        decision=args.decision,
        k=args.top_k,
        thresholds=_thresholds(args),
        reference=args.reference,
        use_reference_threshold=args.reference_threshold,
        verify=args.verify,
        group_by=args.group_by,
        duplicate_fpr=args.duplicate_fpr,
        search=args.search,
        options=_loading_options(args),
        cache=False if args.no_cache else (args.cache or True),
        device=args.device,
        batch_size=args.batch_size,
        precision=args.precision,
        engine=_engine(args, Path(args.out) / "embeddings-parquet"),
        progress=not args.no_progress,
    )
    if fitted is not None:
        result.summary["fit"] = fitted.report
    files = result.save(args.out, gallery_size=args.gallery, anonymise=args.anonymise)
    print(format_summary(result.summary))
    if args.release_dir:
        from deepssim.scanning.release import write_release

        drop = ("Duplicate", "Similar") if args.release_drop == "similar" else ("Duplicate",)
        release = write_release(result, args.release_dir, drop=drop)
        print(
            f"release: {release['released_images']} of {release['generated_images']} generated images "
            f"({release['released_files']} files) -> {args.release_dir} (dropped: {', '.join(drop)}; "
            "release.csv says why)"
        )
    print(f"report: {files['report']}")
    tables = [files[name] for name in ("results", "pairs", "groups", "summary") if name in files]
    print(f"tables: {', '.join(str(path) for path in tables)}")


def format_summary(summary: dict) -> str:
    """The scan summary as a few lines of text for the terminal."""
    thresholds = summary["thresholds"]
    lines = [
        f"{summary['generated_images']} generated vs {summary['training_images']} training images, "
        f"{summary['metric']} ({summary['model']}), thresholds {thresholds['low']:.4g} / "
        f"{thresholds['high']:.4g} ({thresholds['source']})",
        f"  decision: {summary['decision']}",
    ]
    for name, entry in summary["generated_by_class"].items():
        low, high = entry["ci95"]
        lines.append(
            f"  {name:<10} {entry['count']:>7}  {entry['share']:6.1%}  (95% CI {low:.1%} - {high:.1%})"
        )
    memorised = summary["training_images_with_a_duplicate"]
    low, high = memorised["ci95"]
    lines.append(
        f"  training images with at least one Duplicate: {memorised['count']} of {summary['training_images']}"
        f" ({memorised['share']:.1%}, 95% CI {low:.1%} - {high:.1%})"
    )
    if "groups" in summary:
        entry = summary["groups"]["with_a_duplicate"]
        low, high = entry["ci95"]
        lines.append(
            f"  patients ({summary['groups']['by']}) with at least one Duplicate: {entry['count']} of "
            f"{summary['groups']['groups']} ({entry['share']:.1%}, 95% CI {low:.1%} - {high:.1%})"
        )
    if "reference" in summary:
        threshold = next(v for k, v in summary["reference"].items() if k.endswith("_threshold"))
        lines.append(f"  reference 95th percentile of best scores: {threshold:.4f}")
    return "\n".join(lines)


def _add_calibrate_parser(commands) -> None:
    calibrate = commands.add_parser(
        "calibrate",
        help="fit low/high thresholds to labelled pairs",
        description="Find the low/high thresholds that maximise macro-F1 on labelled pairs "
        "(CSV: train_key, generated_key, label with 0 Different, 1 Duplicate, 2 Similar).",
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
        default="deepssim",
        help="deepssim (default), ssim, fsim, sscd=FILE, dar=FILE, semdedup=ARCH:FILE",
    )
    calibrate.add_argument("--out", default="thresholds.json", help="thresholds file to write")
    calibrate.add_argument("--no-progress", action="store_true")
    _add_model_options(calibrate)
    _add_loading_options(calibrate)
    calibrate.set_defaults(handler=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> None:
    from deepssim.evaluation.protocol import calibrate_thresholds

    pairs, train, generated, options = args.pairs, args.train, args.generated, _loading_options(args)
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
    thresholds, f1, count = calibrate_thresholds(
        pairs,
        train,
        generated,
        metric=args.metric,
        model=args.model,
        options=options,
        device=args.device,
        progress=not args.no_progress,
        out=args.out,
    )
    print(
        f"thresholds for {args.metric}: low {thresholds.low:.4f}, high {thresholds.high:.4f} "
        f"(macro-F1 {f1:.3f} on {count} labelled pairs) -> {args.out}"
    )
    print(f"use them with: deepssim scan ... --metric {args.metric} --thresholds {args.out}")


def _add_label_parser(commands) -> None:
    label = commands.add_parser(
        "label",
        help="label a scan's pairs in the browser; or summarise raters' agreement",
        description="Serve a local page (127.0.0.1 only) that shows a scan's pairs one at a time for a "
        "rater to label Different / Similar / Duplicate (keys 1 / 2 / 3), or with --summary report "
        "Fleiss' kappa and write labelled.csv for calibrate and evaluate.",
    )
    action = label.add_mutually_exclusive_group(required=True)
    action.add_argument("--scan", help="a deepssim scan output folder: the pairs to label")
    action.add_argument("--summary", metavar="LABELS_DIR", help="report agreement; write labelled.csv")
    label.add_argument("--out", help="labels folder (labels.sqlite); several raters may share it")
    label.add_argument("--rater", default=getpass.getuser(), help="the rater's name (default: user name)")
    label.add_argument("--port", type=int, default=8765)
    label.add_argument("--pairs", type=int, default=200, help="pairs to label (drawn once per folder)")
    label.add_argument("--seed", type=int, default=0, help="the draw's seed: every rater sees one order")
    label.add_argument("--train", nargs="+", help="the scan's training images, if they moved")
    label.add_argument("--generated", nargs="+", help="the scan's generated images, if they moved")
    label.add_argument("--bootstrap", type=int, default=1000, help="resamples for kappa's interval")
    label.set_defaults(handler=_run_label)


def _run_label(args: argparse.Namespace) -> None:
    from deepssim.labelling import summarise
    from deepssim.labelling.server import HOST, LabellingSession, make_server

    if args.summary:
        report = summarise(args.summary, bootstrap=args.bootstrap, seed=args.seed)
        print(format_agreement(report))
        print(f"labelled.csv and agreement.json -> {args.summary}")
        return
    if not args.out:
        raise DeepSSIMError("--scan needs --out LABELS_DIR (where the labels are kept)")
    session = LabellingSession(
        args.scan,
        args.out,
        rater=args.rater,
        pairs=args.pairs,
        seed=args.seed,
        train=args.train,
        generated=args.generated,
    )
    server = make_server(session, args.port)
    state = session.state()
    print(
        f"labelling {state['total']} pairs as rater {session.rater!r} ({state['done']} done) at "
        f"http://{HOST}:{server.server_address[1]}/ - listening on {HOST} only (this machine); "
        "every click is saved at once; Ctrl+C to stop"
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()


def format_agreement(report) -> str:
    kappa = "n/a (needs two raters on the same pairs)"
    if report.kappa is not None:
        kappa = f"{report.kappa:.3f}"
        if report.kappa_interval is not None:
            kappa += (
                f" (95% bootstrap interval {report.kappa_interval[0]:.3f} to {report.kappa_interval[1]:.3f})"
            )
    lines = [
        f"raters: {', '.join(report.raters) or '(none)'}",
        f"pairs: {report.pairs_labelled} of {report.pairs_in_queue} labelled, "
        f"{report.pairs_labelled_by_all} by every rater; {report.skips} skips",
        f"Fleiss' kappa: {kappa}",
    ]
    if report.per_class_agreement:
        lines.append(
            "per-class agreement: "
            + ", ".join(
                f"{k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in report.per_class_agreement.items()
            )
        )
    labels = list(report.confusion)
    lines.append("confusion between raters (pooled over rater pairs):")
    lines.append("  " + " " * 10 + "".join(f"{name:>11}" for name in labels))
    for a in labels:
        lines.append(f"  {a:<10}" + "".join(f"{report.confusion[a][b]:>11}" for b in labels))
    lines.append(f"majority labels: {report.majority_pairs} pairs; ties left out: {report.ties}")
    return "\n".join(lines)


def _add_evaluate_parser(commands) -> None:
    from deepssim.evaluation.protocol import EvaluateSettings

    defaults = EvaluateSettings()
    evaluate = commands.add_parser(
        "evaluate",
        help="the paper's evaluation protocol on labelled pairs",
        description="Per-class precision/recall, macro-F1, weighted F1, silhouette, TPR at 5%% FPR and AUROC "
        "(each with a bootstrap 95%% CI) of every metric, aligned and misaligned, with the paper's and "
        "calibrated thresholds.",
    )
    evaluate.add_argument("--pairs", required=True, help="CSV: train_key, generated_key, label[, split]")
    evaluate.add_argument("--train", required=True, nargs="+", help="training images")
    evaluate.add_argument("--generated", required=True, nargs="+", help="generated images")
    evaluate.add_argument(
        "--metrics",
        default="deepssim,ssim",
        help="comma-separated: deepssim[=MODEL], ssim, fsim, sscd=FILE, dar=FILE, semdedup=ARCH:FILE",
    )
    evaluate.add_argument("--setting", choices=EvaluateSettings.choices("setting"), default=defaults.setting)
    evaluate.add_argument("--calib-split", help="split whose pairs calibrate thresholds (e.g. calib)")
    evaluate.add_argument(
        "--test-split", help="split whose pairs are scored (default: all pairs not in --calib-split)"
    )
    evaluate.add_argument(
        "--bootstrap", type=int, default=defaults.bootstrap, help="bootstrap resamples for the CIs"
    )
    evaluate.add_argument("--seed", type=int, default=defaults.seed)
    evaluate.add_argument("--out", required=True, help="output folder")
    evaluate.add_argument("--no-progress", action="store_true")
    _add_model_options(evaluate)
    _add_loading_options(evaluate)
    evaluate.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    from deepssim.evaluation.protocol import EvaluateSettings, evaluate, metrics_markdown

    settings = EvaluateSettings(
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
        setting=args.setting,
        calib_split=args.calib_split,
        test_split=args.test_split,
        bootstrap=args.bootstrap,
        seed=args.seed,
        device=args.device,
    )
    rows = evaluate(
        args.pairs,
        args.train,
        args.generated,
        settings=settings,
        model=args.model,
        options=_loading_options(args),
        out_dir=args.out,
        progress=not args.no_progress,
    )
    print(metrics_markdown(rows), end="")
    print(f"-> {Path(args.out) / 'metrics.csv'}, metrics.md, scores.csv, histogram_*.png")


def _add_benchmark_parser(commands) -> None:
    from deepssim.evaluation.builder import BenchmarkSettings

    defaults = BenchmarkSettings()
    benchmark = commands.add_parser("benchmark", help="labelled benchmarks")
    actions = benchmark.add_subparsers(dest="action", required=True)
    build = actions.add_parser(
        "build",
        help="build a labelled benchmark from training images",
        description="From real images or volumes, write a training folder, a generated folder with planted "
        "Duplicates, Similar and Different images, and pairs.csv (labels, calib/test split).",
    )
    build.add_argument("--images", required=True, nargs="+", help="real images or volumes")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--duplicates", type=int, default=defaults.duplicates)
    build.add_argument("--similar", type=int, default=defaults.similar)
    build.add_argument("--different", type=int, default=defaults.different)
    build.add_argument("--train-share", type=float, default=defaults.train_share, help="share of subjects")
    build.add_argument(
        "--slice-share",
        type=float,
        default=defaults.slice_share,
        help="share of a training subject's slices kept",
    )
    build.add_argument("--max-training-images", type=int, default=defaults.max_training_images)
    build.add_argument(
        "--copy-strength",
        type=float,
        default=defaults.copy_strength,
        help="degradation of planted copies (0-1)",
    )
    build.add_argument("--seed", type=int, default=defaults.seed)
    build.add_argument("--no-progress", action="store_true")
    _add_loading_options(build)
    build.set_defaults(handler=_run_benchmark_build)


def _run_benchmark_build(args: argparse.Namespace) -> None:
    from deepssim.evaluation.builder import BenchmarkSettings, build_benchmark

    settings = BenchmarkSettings(
        duplicates=args.duplicates,
        similar=args.similar,
        different=args.different,
        train_share=args.train_share,
        slice_share=args.slice_share,
        max_training_images=args.max_training_images,
        copy_strength=args.copy_strength,
        seed=args.seed,
    )
    summary = build_benchmark(args.images, args.out, settings, _loading_options(args), not args.no_progress)
    out = Path(args.out)
    print(
        f"{summary['training_images']} training images, {summary['generated_images']} generated "
        f"({summary['pairs_by_label']}) -> {out / 'train'}, {out / 'generated'}, {out / 'pairs.csv'}"
    )


def _add_fit_parser(commands) -> None:
    from deepssim.training.fit import FitSettings

    defaults = FitSettings()
    fit = commands.add_parser(
        "fit",
        help="fine-tune a DeepSSIM model on your own training images within a time budget",
        description="Fine-tune a start model on self-supervised pairs of your training images; validate "
        "on held-out files and keep the fitted model only if it is better. Writes OUT/fitted.safetensors "
        "(+ .json) and OUT/fit.json; then: deepssim scan --model OUT/fitted.safetensors",
    )
    fit.add_argument("--train", required=True, nargs="+", help="the training images: folders or files")
    fit.add_argument("--generated", nargs="+", help="generated images (used only as unrelated partners)")
    fit.add_argument("--out", required=True, help="output folder")
    fit.add_argument(
        "--from", dest="start", default=defaults.start, help="start model: default or a checkpoint"
    )
    fit.add_argument("--minutes", type=float, default=defaults.minutes, help="time budget (default 10)")
    fit.add_argument("--epochs", type=int, help="fixed number of epochs instead of the time budget")
    fit.add_argument("--n-pairs", type=int, default=defaults.n_pairs)
    fit.add_argument("--precision", choices=PRECISIONS, default=defaults.precision)
    fit.add_argument("--seed", type=int, default=defaults.seed)
    fit.add_argument("--device", default=defaults.device)
    fit.add_argument("--no-progress", action="store_true")
    _add_loading_options(fit)
    fit.set_defaults(handler=_run_fit)


def _run_fit(args: argparse.Namespace) -> None:
    from deepssim.training.fit import FitSettings, describe, fit

    settings = FitSettings(
        start=args.start,
        minutes=args.minutes,
        epochs=args.epochs,
        n_pairs=args.n_pairs,
        precision=args.precision,
        seed=args.seed,
        device=args.device,
    )
    result = fit(
        args.train,
        args.out,
        generated=args.generated,
        settings=settings,
        options=_loading_options(args),
        progress=not args.no_progress,
    )
    print(describe(result))
    print(f"model: {result.model_path} (+ .json); report: {Path(args.out) / 'fit.json'}")


def _add_train_dar_parser(commands) -> None:
    from deepssim.metrics.dar import DarSettings

    defaults = DarSettings()
    dar = commands.add_parser(
        "train-dar",
        help="train the Dar et al. baseline (ResNet-50, NT-Xent)",
        description="Train the Dar et al. embedder on training images, then scan with "
        "--metric dar=OUT/dar.safetensors",
    )
    dar.add_argument("--images", required=True, nargs="+")
    dar.add_argument("--out", required=True)
    dar.add_argument("--epochs", type=int, default=defaults.epochs)
    dar.add_argument("--batch-size", type=int, default=defaults.batch_size)
    dar.add_argument("--lr", type=float, default=defaults.learning_rate)
    dar.add_argument("--precision", choices=("float32", "bfloat16"), default=defaults.precision)
    dar.add_argument("--seed", type=int, default=defaults.seed)
    dar.add_argument("--device", default=defaults.device)
    dar.add_argument("--no-progress", action="store_true")
    _add_loading_options(dar)
    dar.set_defaults(handler=_run_train_dar)


def _run_train_dar(args: argparse.Namespace) -> None:
    from deepssim.metrics.dar import DarSettings, train_dar

    settings = DarSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        precision=args.precision,
        seed=args.seed,
        device=args.device,
    )
    path = train_dar(args.images, args.out, settings, _loading_options(args), not args.no_progress)
    print(f"Dar model: {path} (+ .json); use --metric dar={path}")


def _add_train_parser(commands) -> None:
    from deepssim.embedding.networks import ARCHITECTURES
    from deepssim.training.augment import AUGMENTATION_SETS
    from deepssim.training.train import TrainSettings

    defaults = TrainSettings()
    train = commands.add_parser(
        "train",
        help="train a DeepSSIM embedder on image pairs",
        description="Train a DeepSSIM embedder: the cosine of two augmented views regresses their "
        "clean SSIM. Pairs come from --pairs, or are sampled self-supervised from the images.",
    )
    train.add_argument("--images", nargs="+", help="training images: folders or files")
    train.add_argument(
        "--synthetic-subjects",
        type=int,
        default=defaults.synthetic_subjects,
        help="add N domain-randomised pseudo-subjects made from the MNI152 tissue maps",
    )
    train.add_argument("--slices-per-subject", type=int, default=defaults.slices_per_subject)
    train.add_argument("--generated", nargs="+", help="generated images (optional; needed with --pairs)")
    train.add_argument("--pairs", help="CSV with train_key, generated_key[, ssim][, split]")
    train.add_argument("--out", required=True, help="run folder: checkpoints, log.csv, cached pairs")
    train.add_argument("--architecture", choices=list(ARCHITECTURES), default=defaults.architecture)
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--lr", type=float, default=defaults.learning_rate, help="AdamW learning rate")
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    train.add_argument("--grad-clip", type=float, default=defaults.grad_clip)
    train.add_argument(
        "--layer-decay", type=float, default=defaults.layer_decay, help="layer-wise lr decay (1 = off)"
    )
    train.add_argument("--precision", choices=PRECISIONS, default=defaults.precision)
    train.add_argument("--augmentation", choices=AUGMENTATION_SETS, default=defaults.augmentation)
    train.add_argument(
        "--n-pairs", type=int, default=defaults.n_pairs, help="self-supervised pairs to sample"
    )
    train.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--pretrained", choices=("imagenet",), help="start from ImageNet backbone weights")
    train.add_argument("--pretrained-file", help="the ImageNet weights file (default: torch.hub cache)")
    train.add_argument("--device", default=defaults.device)
    train.add_argument("--restart", action="store_true", help="ignore a previous run in --out")
    train.add_argument("--no-progress", action="store_true")
    _add_loading_options(train)
    train.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from deepssim.training.train import TrainSettings, train

    settings = TrainSettings(
        architecture=args.architecture,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        layer_decay=args.layer_decay,
        precision=args.precision,
        augmentation=args.augmentation,
        n_pairs=args.n_pairs,
        val_fraction=args.val_fraction,
        seed=args.seed,
        synthetic_subjects=args.synthetic_subjects,
        slices_per_subject=args.slices_per_subject,
        pretrained=args.pretrained,
        pretrained_file=args.pretrained_file,
        device=args.device,
    )
    result = train(
        args.images,
        args.out,
        settings,
        generated=args.generated,
        pairs_csv=args.pairs,
        options=_loading_options(args),
        progress=not args.no_progress,
        resume=not args.restart,
    )
    best = result.summary["best_validation"]
    print(
        f"best epoch {result.summary['best_epoch']} of {len(result.log)}: validation MAE "
        f"aligned {best['val_aligned_mae']:.4f}, misaligned {best['val_misaligned_mae']:.4f}"
    )
    print(f"model: {result.best_checkpoint} (+ .json); log: {Path(args.out) / 'log.csv'}")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        help="'default', a checkpoint (.safetensors + .json) or a TorchScript file",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def _add_embed_parser(commands) -> None:
    embed = commands.add_parser(
        "embed",
        help="write DeepSSIM embeddings of images",
        description="Embed images with a DeepSSIM model; writes an .npz with embeddings and keys.",
    )
    embed.add_argument("--images", required=True, nargs="+", help="folders or files")
    embed.add_argument("--out", required=True, help="output .npz (embeddings, keys, model)")
    embed.add_argument("--batch-size", type=int, default=64)
    embed.add_argument("--precision", choices=PRECISIONS, default="auto")
    embed.add_argument("--no-progress", action="store_true")
    _add_model_options(embed)
    _add_loading_options(embed)
    embed.set_defaults(handler=_run_embed)


def _run_embed(args: argparse.Namespace) -> None:
    from deepssim.embedding.model import DeepSSIM
    from deepssim.io.load import ImageSet

    out = Path(args.out)
    if out.suffix != ".npz":
        raise DeepSSIMError(f"--out {out}: the output must end in .npz")
    model = DeepSSIM.load(args.model, args.device)
    images = ImageSet.from_paths(args.images, _loading_options(args), not args.no_progress)
    embeddings = model.embed(images, args.batch_size, args.precision, progress=not args.no_progress)
    from deepssim.io.files import atomic_path

    with atomic_path(out, suffix=".npz") as temporary, open(temporary, "wb") as handle:
        np.savez(
            handle, embeddings=embeddings, keys=np.array(images.keys, dtype=str), model=np.array(model.name)
        )
    print(f"{len(images)} embeddings of dimension {embeddings.shape[1]} -> {out}")


def _add_export_parser(commands) -> None:
    export = commands.add_parser(
        "export",
        help="export a model to TorchScript",
        description="Write a TorchScript embedder that maps (B, 3, H, W) z-scored images to (B, 256).",
    )
    export.add_argument("--out", required=True, help="output TorchScript file (.pt)")
    _add_model_options(export)
    export.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    from deepssim.embedding.model import DeepSSIM

    path = DeepSSIM.load(args.model, args.device).export_torchscript(args.out)
    print(f"TorchScript embedder -> {path}")


def _run_ssim_matrix(args: argparse.Namespace) -> None:
    from deepssim.io.load import ImageSet
    from deepssim.ssim.matrix import compute_ssim_matrix

    out = Path(args.out)
    if out.suffix != ".npz":
        raise DeepSSIMError(f"--out {out}: the output must end in .npz")
    if args.top_k < 0:
        raise DeepSSIMError("--top-k must be 0 or more")
    options = _loading_options(args)
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
            engine=_engine(args),
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
        print(
            f"  generated images whose best train match has SSIM > 0.85: "
            f"{int((best > 0.85).sum())} of {len(best)}"
        )
        if args.top_k:
            print(f"  top-{args.top_k} matches -> {top_k_path}")


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"deepssim: warning: {message}", file=sys.stderr)


RENAMED_FLAGS = {"--real": "--train", "--synthetic": "--generated"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for old, new in RENAMED_FLAGS.items():
        if old in argv:
            print(f"deepssim: error: {old} is now {new} (one name per role)", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    warnings.showwarning = _one_line_warning
    try:
        args.handler(args)
    except DeepSSIMError as error:
        print(f"deepssim: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stderr.close()
        return 0
    except (PermissionError, FileExistsError, NotADirectoryError, IsADirectoryError) as error:
        # an output folder that cannot be created or written: the user's to fix, no traceback
        where = error.filename or "the output location"
        print(
            f"deepssim: error: cannot write {where} ({error.strerror}); choose another --out",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(
            "deepssim: interrupted; files being written were discarded (train and ldm resume from "
            "their last finished epoch when rerun; scan reuses cached embeddings)",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
