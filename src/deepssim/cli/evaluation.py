"""``deepssim evaluate`` (the paper's protocol on labelled pairs) and ``benchmark build``."""

from __future__ import annotations

import argparse
from pathlib import Path

from deepssim.cli.options import (
    add_loading_options,
    add_model_options,
    add_progress_option,
    add_settings_options,
    check_output_folder_or_file,
    loading_options,
    settings_from_args,
)
from deepssim.errors import DeepSSIMError
from deepssim.evaluation.builder import BenchmarkSettings
from deepssim.evaluation.protocol import EvaluateSettings


def add_commands(commands) -> None:
    _add_evaluate(commands)
    _add_benchmark(commands)


def _add_evaluate(commands) -> None:
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
    evaluate.add_argument("--out", required=True, help="output folder")
    add_settings_options(evaluate, EvaluateSettings)
    add_progress_option(evaluate)
    add_model_options(evaluate, device=False)
    add_loading_options(evaluate)
    evaluate.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    from deepssim.evaluation.protocol import evaluate, metrics_markdown

    settings, options = settings_from_args(EvaluateSettings, args), loading_options(args)
    check_output_folder_or_file(args.out)
    if not Path(args.pairs).is_file():
        raise DeepSSIMError(f"--pairs {args.pairs}: no such file")
    rows = evaluate(
        args.pairs,
        args.train,
        args.generated,
        settings=settings,
        model=args.model,
        options=options,
        out_dir=args.out,
        progress=not args.no_progress,
    )
    print(metrics_markdown(rows), end="")
    print(f"-> {Path(args.out) / 'metrics.csv'}, metrics.md, scores.csv, histogram_*.png")


def _add_benchmark(commands) -> None:
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
    add_settings_options(build, BenchmarkSettings)
    add_progress_option(build)
    add_loading_options(build)
    build.set_defaults(handler=_run_benchmark_build)


def _run_benchmark_build(args: argparse.Namespace) -> None:
    from deepssim.evaluation.builder import build_benchmark

    settings, options = settings_from_args(BenchmarkSettings, args), loading_options(args)
    check_output_folder_or_file(args.out)
    summary = build_benchmark(args.images, args.out, settings, options, not args.no_progress)
    out = Path(args.out)
    print(
        f"{summary['training_images']} training images, {summary['generated_images']} generated "
        f"({summary['pairs_by_label']}) -> {out / 'train'}, {out / 'generated'}, {out / 'pairs.csv'}"
    )
