"""``deepssim ldm``: the case study's latent diffusion model (train, monitor, generate)."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from deepssim.cli.options import add_loading_options, add_progress_option, loading_options
from deepssim.io.load import LoadOptions


def add_commands(commands) -> None:
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
        add_progress_option(parser)
    for parser in (vae, diffusion):
        add_loading_options(parser)
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
        loading_options(args),
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
        options = LoadOptions(**{**asdict(loading_options(args)), "size": size, "fit": "resize"})
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
        options=loading_options(args),
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
