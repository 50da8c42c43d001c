"""The ``deepssim`` command: a thin layer that parses options and calls the Python API.

One module per command group (:mod:`deepssim.cli.scan`, ``label``, ``evaluation``, ``training``,
``ldm``), each with ``add_commands(subparsers)``; shared options and the settings-to-options
helper are in :mod:`deepssim.cli.options`.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from deepssim._version import __version__
from deepssim.cli import evaluation, label, ldm, scan, training
from deepssim.errors import DeepSSIMError

COMMAND_GROUPS = (scan, label, evaluation, training, ldm)


class _Parser(argparse.ArgumentParser):
    """Every option error as one line, ``deepssim: error: ...``, exit status 2 (as a DeepSSIMError)."""

    def error(self, message: str):
        self.exit(2, f"deepssim: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="deepssim",
        description="Find memorised copies of training images among generated images.",
    )
    parser.add_argument("--version", action="version", version=f"deepssim {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"deepssim: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
