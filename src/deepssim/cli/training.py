"""``deepssim train``, ``fit``, ``train-dar``, ``embed`` and ``export``: models."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from deepssim.cli.options import (
    add_loading_options,
    add_model_options,
    add_progress_option,
    add_settings_options,
    check_output_folder_or_file,
    loading_options,
    npz_output,
    settings_from_args,
)
from deepssim.hardware import PRECISIONS
from deepssim.settings import whole_number
from deepssim.training.dar import DarSettings
from deepssim.training.fit import FitSettings
from deepssim.training.train import TrainSettings


def add_commands(commands) -> None:
    _add_train(commands)
    _add_fit(commands)
    _add_train_dar(commands)
    _add_embed(commands)
    _add_export(commands)


def _add_train(commands) -> None:
    train = commands.add_parser(
        "train",
        help="train a DeepSSIM embedder on image pairs",
        description="Train a DeepSSIM embedder: the cosine of two augmented views regresses their "
        "clean SSIM. Pairs come from --pairs, or are sampled self-supervised from the images.",
    )
    train.add_argument("--images", nargs="+", help="training images: folders or files")
    train.add_argument("--generated", nargs="+", help="generated images (optional; needed with --pairs)")
    train.add_argument("--pairs", help="CSV with train_key, generated_key[, ssim][, split]")
    train.add_argument("--out", required=True, help="run folder: checkpoints, log.csv, cached pairs")
    add_settings_options(train, TrainSettings)
    train.add_argument("--restart", action="store_true", help="ignore a previous run in --out")
    add_progress_option(train)
    add_loading_options(train)
    train.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from deepssim.training.train import train

    settings, options = settings_from_args(TrainSettings, args), loading_options(args)
    settings.check()
    check_output_folder_or_file(args.out)
    result = train(
        args.images,
        args.out,
        settings,
        generated=args.generated,
        pairs_csv=args.pairs,
        options=options,
        progress=not args.no_progress,
        resume=not args.restart,
    )
    best = result.summary["best_validation"]
    print(
        f"best epoch {result.summary['best_epoch']} of {len(result.log)}: validation MAE "
        f"aligned {best['val_aligned_mae']:.4f}, misaligned {best['val_misaligned_mae']:.4f}"
    )
    print(f"model: {result.best_checkpoint} (+ .json); log: {Path(args.out) / 'log.csv'}")


def _add_fit(commands) -> None:
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
    add_settings_options(fit, FitSettings)
    add_progress_option(fit)
    add_loading_options(fit)
    fit.set_defaults(handler=_run_fit)


def _run_fit(args: argparse.Namespace) -> None:
    from deepssim.training.fit import describe, fit

    settings, options = settings_from_args(FitSettings, args), loading_options(args)
    check_output_folder_or_file(args.out)
    result = fit(
        args.train,
        args.out,
        generated=args.generated,
        settings=settings,
        options=options,
        progress=not args.no_progress,
    )
    print(describe(result))
    print(f"model: {result.model_path} (+ .json); report: {Path(args.out) / 'fit.json'}")


def _add_train_dar(commands) -> None:
    dar = commands.add_parser(
        "train-dar",
        help="train the Dar et al. baseline (ResNet-50, NT-Xent)",
        description="Train the Dar et al. embedder on training images, then scan with "
        "--metric dar=OUT/dar.safetensors",
    )
    dar.add_argument("--images", required=True, nargs="+")
    dar.add_argument("--out", required=True)
    add_settings_options(dar, DarSettings)
    add_progress_option(dar)
    add_loading_options(dar)
    dar.set_defaults(handler=_run_train_dar)


def _run_train_dar(args: argparse.Namespace) -> None:
    from deepssim.training.dar import train_dar

    settings, options = settings_from_args(DarSettings, args), loading_options(args)
    check_output_folder_or_file(args.out)
    path = train_dar(args.images, args.out, settings, options, not args.no_progress)
    print(f"Dar model: {path} (+ .json); use --metric dar={path}")


def _add_embed(commands) -> None:
    embed = commands.add_parser(
        "embed",
        help="write DeepSSIM embeddings of images",
        description="Embed images with a DeepSSIM model; writes an .npz with embeddings and keys.",
    )
    embed.add_argument("--images", required=True, nargs="+", help="folders or files")
    embed.add_argument("--out", required=True, help="output .npz (embeddings, keys, model)")
    embed.add_argument("--batch-size", type=whole_number(1), default=64, help="images per batch (default 64)")
    embed.add_argument("--precision", choices=PRECISIONS, default="auto")
    add_progress_option(embed)
    add_model_options(embed)
    add_loading_options(embed)
    embed.set_defaults(handler=_run_embed)


def _run_embed(args: argparse.Namespace) -> None:
    from deepssim.embedding.model import DeepSSIM
    from deepssim.io.files import atomic_path
    from deepssim.io.load import ImageSet

    out = npz_output(args.out)
    check_output_folder_or_file(args.out, folder=False)
    options = loading_options(args)
    model = DeepSSIM.load(args.model, args.device)
    images = ImageSet.from_paths(args.images, options, not args.no_progress)
    embeddings = model.embed(images, args.batch_size, args.precision, progress=not args.no_progress)
    with atomic_path(out, suffix=".npz") as temporary, open(temporary, "wb") as handle:
        np.savez(
            handle, embeddings=embeddings, keys=np.array(images.keys, dtype=str), model=np.array(model.name)
        )
    print(f"{len(images)} embeddings of dimension {embeddings.shape[1]} -> {out}")


def _add_export(commands) -> None:
    export = commands.add_parser(
        "export",
        help="export a model to TorchScript",
        description="Write a TorchScript embedder that maps (B, 3, H, W) z-scored images to (B, 256).",
    )
    export.add_argument("--out", required=True, help="output TorchScript file (.pt)")
    add_model_options(export)
    export.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    from deepssim.embedding.model import DeepSSIM

    path = DeepSSIM.load(args.model, args.device).export_torchscript(args.out)
    print(f"TorchScript embedder -> {path}")
