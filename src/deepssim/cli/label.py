"""``deepssim label``: label a scan's pairs in the browser, or summarise raters' agreement."""

from __future__ import annotations

import argparse
import getpass
from pathlib import Path

from deepssim.errors import DeepSSIMError
from deepssim.io.files import check_writable
from deepssim.settings import whole_number


def add_commands(commands) -> None:
    _add_label(commands)


def _add_label(commands) -> None:
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
    label.add_argument(
        "--port", type=whole_number(1, 65535), default=8765, help="the local port to serve on (default 8765)"
    )
    label.add_argument(
        "--pairs", type=whole_number(1), default=200, help="pairs to label (drawn once per folder)"
    )
    label.add_argument("--seed", type=int, default=0, help="the draw's seed: every rater sees one order")
    label.add_argument("--train", nargs="+", help="the scan's training images, if they moved")
    label.add_argument("--generated", nargs="+", help="the scan's generated images, if they moved")
    label.add_argument(
        "--bootstrap", type=whole_number(0), default=1000, help="resamples for kappa's interval (0: none)"
    )
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
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise DeepSSIMError(f"--out {args.out} is a file; the labels go into a folder")
    if not Path(args.scan).is_dir():
        raise DeepSSIMError(f"--scan {args.scan}: no such folder (a deepssim scan --out folder)")
    check_writable(args.out)
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
