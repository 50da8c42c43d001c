"""The ``deepssim`` command: a thin layer that parses options and calls the Python API."""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.load import LoadOptions
from deepssim.normalise import FIT_MODES, parse_size

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
        help="SSIM of every (real, synthetic) pair, saved as .npz",
        description="Compute the exact SSIM (the paper's label) of every (real, synthetic) pair.",
    )
    matrix.add_argument("--real", required=True, nargs="+", help="folder(s) or files of real images")
    matrix.add_argument(
        "--synthetic", required=True, nargs="+", help="folder(s) or files of synthetic images"
    )
    matrix.add_argument("--out", required=True, help="output .npz (matrix, keys, settings)")
    matrix.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="also write OUT.topK.csv with the K most similar real images per synthetic image",
    )
    matrix.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    matrix.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    matrix.add_argument("--block-size", type=int, default=2048, help="images per block (memory)")
    matrix.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_loading_options(matrix)
    matrix.set_defaults(handler=_run_ssim_matrix)
    return parser


def _run_ssim_matrix(args: argparse.Namespace) -> None:
    from deepssim.load import ImageSet
    from deepssim.pairwise import compute_ssim_matrix

    out = Path(args.out)
    if out.suffix != ".npz":
        raise DeepSSIMError(f"--out {out}: the output must end in .npz")
    if args.top_k < 0:
        raise DeepSSIMError("--top-k must be 0 or more")
    options = _loading_options(args)
    progress = not args.no_progress
    real = ImageSet.from_paths(args.real, options, progress, "indexing real images")
    synthetic = ImageSet.from_paths(args.synthetic, options, progress, "indexing synthetic images")
    matrix_bytes = len(real) * len(synthetic) * np.dtype(args.dtype).itemsize
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".deepssim-") as scratch:
        matrix_file = Path(scratch) / "ssim.npy" if matrix_bytes > IN_MEMORY_MATRIX_BYTES else None
        result = compute_ssim_matrix(
            real,
            synthetic,
            dtype=args.dtype,
            device=args.device,
            block_size=args.block_size,
            progress=progress,
            matrix_file=matrix_file,
        )
        result.save(out)
        if args.top_k:
            top_k_path = out.with_suffix(f".top{args.top_k}.csv")
            result.save_top_k(top_k_path, args.top_k)
        values = np.asarray(result.values)
        print(
            f"SSIM matrix: {len(real)} real x {len(synthetic)} synthetic images "
            f"of {real.shape[0]}x{real.shape[1]} -> {out}"
        )
        print(f"  SSIM min {values.min():.4f}  median {np.median(values):.4f}  max {values.max():.4f}")
        best = values.max(axis=0)
        print(
            f"  synthetic images whose best real match has SSIM > 0.85: "
            f"{int((best > 0.85).sum())} of {len(best)}"
        )
        if args.top_k:
            print(f"  top-{args.top_k} matches -> {top_k_path}")


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"deepssim: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
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
    except KeyboardInterrupt:
        print("deepssim: interrupted; no partial output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
