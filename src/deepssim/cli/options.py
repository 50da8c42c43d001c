"""Options shared by several commands, and the one helper that turns a settings dataclass into
command-line options: each setting's flag, type, default, choices and help are written once, on
its field (:func:`deepssim.settings.option`)."""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from deepssim.errors import DeepSSIMError
from deepssim.io.files import check_writable
from deepssim.io.load import LoadOptions
from deepssim.io.normalise import FIT_MODES, parse_size
from deepssim.io.orientation import PLANES, parse_spacing
from deepssim.settings import allowed_values


def add_settings_options(parser, cls, *, skip: tuple[str, ...] = ()) -> None:
    """Add an option for every field of ``cls`` that carries :func:`option` metadata."""
    hints = typing.get_type_hints(cls)
    for field in fields(cls):
        meta = field.metadata
        if "help" not in meta or field.name in skip:
            continue
        default = field.default if field.default is not MISSING else field.default_factory()
        flags = [meta["flag"] or "--" + field.name.replace("_", "-")]
        if meta["short"]:
            flags.insert(0, meta["short"])
        kind = _base_type(hints[field.name])
        arguments = {"dest": field.name, "default": default, "help": meta["help"]}
        if kind is bool:
            arguments["action"] = "store_true"
        else:
            allowed = allowed_values(cls, field.name)
            if allowed:
                arguments["choices"] = list(allowed)
            arguments["type"] = _comma_list if kind is tuple else (kind if kind in (int, float) else str)
            if default not in (None, ()):
                shown = ",".join(default) if kind is tuple else default
                arguments["help"] += f" (default {shown})"
        parser.add_argument(*flags, **arguments)


def settings_from_args(cls, args: argparse.Namespace, **given):
    """``cls`` from the parsed options its fields generated, plus ``given`` fields."""
    values = {
        f.name: getattr(args, f.name) for f in fields(cls) if "help" in f.metadata and hasattr(args, f.name)
    }
    return cls(**{**values, **given})


def _base_type(hint):
    """int / float / str / bool / tuple, from a hint such as ``int | None`` or ``tuple[str, ...]``."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return str
    if origin is tuple:
        return tuple
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    if arguments:  # a union with None
        return _base_type(arguments[0])
    return hint


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _slice_range(text: str) -> tuple[int | None, int | None]:
    try:
        start, stop = text.split(":")
        return (int(start) if start else None, int(stop) if stop else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP (e.g. 20:120), got {text!r}") from None


def add_loading_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reading images")
    group.add_argument("--size", type=str, help="bring every image to HxW (e.g. 136x112)")
    group.add_argument(
        "--fit",
        choices=FIT_MODES,
        default="pad",
        help="how --size is applied: centre pad/crop (default) or bilinear resize",
    )
    group.add_argument(
        "--plane",
        choices=tuple(PLANES),
        default="axial",
        help="anatomical plane to slice NIfTI volumes in, after reading them as RAS (default axial)",
    )
    group.add_argument(
        "--axis",
        type=int,
        choices=(0, 1, 2),
        help="legacy: slice NIfTI volumes along this voxel axis as stored, not reoriented (use --plane)",
    )
    group.add_argument(
        "--spacing", type=parse_spacing, help="resample NIfTI volumes to this voxel size: MM or XxYxZ"
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


def loading_options(args: argparse.Namespace) -> LoadOptions:
    if not 0 <= args.min_foreground <= 1:
        raise DeepSSIMError(
            f"--min-foreground is a fraction of the pixels, in [0, 1], not {args.min_foreground}"
        )
    return LoadOptions(
        axis=args.axis,
        plane=args.plane,
        spacing=args.spacing,
        slice_range=args.slices,
        min_foreground=args.min_foreground,
        size=parse_size(args.size) if args.size else None,
        fit=args.fit,
        skip_bad=args.skip_bad,
    )


def add_model_options(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """--model (and --device, unless the command's settings have their own)."""
    parser.add_argument(
        "--model",
        default="default",
        help="'default', a checkpoint (.safetensors + .json) or a TorchScript file",
    )
    if device:
        parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def npz_output(text: str) -> Path:
    """An output path that must end in .npz (the commands that write arrays)."""
    out = Path(text)
    if out.suffix != ".npz":
        raise DeepSSIMError(f"--out {out}: the output must end in .npz")
    return out


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_threshold_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("thresholds (default: the paper's 0.6 / 0.85)")
    group.add_argument("--low", type=float, help="scores at or below this are Different")
    group.add_argument("--high", type=float, help="scores above this are Duplicate")
    group.add_argument("--thresholds", help="a thresholds .json written by `deepssim calibrate`")


def thresholds_from_args(args: argparse.Namespace):
    """A thresholds file, or (low, high) where either may be None (the metric's is used)."""
    from deepssim.scanning.decide import Thresholds, check_threshold_values

    if args.thresholds:
        if args.low is not None or args.high is not None:
            raise DeepSSIMError("give either --thresholds FILE or --low/--high, not both")
        return Thresholds.load(args.thresholds)
    check_threshold_values(args.low, args.high)  # before any work
    return (args.low, args.high)


def add_engine_options(parser: argparse.ArgumentParser, with_choice: bool = True) -> None:
    """--engine (unless the command's settings have it) and every engine's own options."""
    from deepssim.execution import ENGINES

    group = parser.add_argument_group("engine (where the work runs)")
    if with_choice:
        group.add_argument(
            "--engine",
            choices=list(ENGINES),
            default="local",
            help="local: this process (default); ray: a Ray cluster (pip install 'deepssim[ray]')",
        )
    for name in ENGINES:
        ENGINES[name].add_options(group)


def engine_from_args(args: argparse.Namespace, shard_dir: Path | None = None):
    """The engine object the flags ask for, with its own options."""
    from deepssim.execution import ENGINES

    return ENGINES[args.engine].from_options(vars(args), shard_dir)


def check_output_folder_or_file(out: str, folder: bool = True, option: str = "--out") -> None:
    """Before any work: ``out`` is not the wrong kind of thing (a file where a folder goes, or the
    reverse) and can be created (see :func:`deepssim.io.files.check_writable`)."""
    path = Path(out)
    if folder and path.exists() and not path.is_dir():
        raise DeepSSIMError(f"{option} {out} is a file; it names the output folder")
    if not folder and path.is_dir():
        raise DeepSSIMError(f"{option} {out} is a folder; it names the output file")
    check_writable(path, option)
