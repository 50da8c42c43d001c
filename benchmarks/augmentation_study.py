"""The augmentation study: which training choices make DeepSSIM's cosine right, and its retrieval
find every copy, on sources it never saw.

    python benchmarks/augmentation_study.py --out build/augmentation-study --jobs 2

Every arm trains the same network (``deepssim_fast``) from scratch on the same budget (the same
pseudo-subjects, number of pairs, epochs, batch size and seed) and differs from the baseline in
one thing: an augmentation family on or off, the synthetic subjects' contrast randomisation,
the pair kinds, or the retrieval loss. The baseline is ``flip+rotate+translate+gamma`` (the
families of the bundled model's ``rigid`` set). Training data are synthetic only, so every
bundled real source is held out from every arm; each arm is measured on the leave-one-source-out
protocol of ``benchmarks/generalisation.py`` (thresholds calibrated on the other sources):

- cosine MAE against the clean aligned pair's SSIM, aligned and misaligned, and the mean signed
  error by planted pair kind;
- macro-F1 of the cosine, aligned and misaligned;
- recall@1, @5 and @10 of degraded, misaligned copies among all of the source's images;
- two-stage macro-F1: a scan of each source's images with Duplicate queries (degraded copies),
  Similar queries (3 px deformations, degraded) and Different queries (other sources' images),
  all misaligned: the arm retrieves the top 10, registered SSIM decides.

Arms run in parallel (``--jobs``), each resumable (a finished arm is not retrained; an
interrupted one resumes from its last epoch). Writes per arm ``ARM/metrics.json`` and overall
``study.json``, ``results.md`` and ``augmentation_study.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

BASE = "flip+rotate+translate+gamma"
HARD_KINDS = ("neighbour", "same_level", "lookalike")
ALL_KINDS = ("copy", "neighbour", "deform", "blend", "same_level", "lookalike", "random", "texture")
ARMS = {  # name: (TrainSettings fields that differ from the baseline, what the arm asks)
    "baseline": ({}, f"{BASE}: the bundled model's families"),
    "no augmentation": ({"augmentation": "none"}, "is invariance learned at all without views?"),
    "- flip": ({"augmentation": "rotate+translate+gamma"}, "flips"),
    "- rotate, translate": ({"augmentation": "flip+gamma"}, "small rigid moves"),
    "- gamma": ({"augmentation": "flip+rotate+translate"}, "contrast curve"),
    "+ scale": ({"augmentation": BASE + "+scale"}, "zoom 0.9-1.05"),
    "+ elastic": ({"augmentation": BASE + "+elastic"}, "deformations up to 2 px"),
    "+ blur, noise, bias": ({"augmentation": BASE + "+blur+noise+bias"}, "acquisition degradations"),
    "+ frame": ({"augmentation": BASE + "+frame"}, "a generator's bright border frame"),
    "fixed contrast": ({"synthetic_contrast": "t1"}, "every pseudo-subject T1-like"),
    "- hard pairs": (
        {"pair_kinds": ",".join(k for k in ALL_KINDS if k not in HARD_KINDS)},
        "no neighbouring-slice, same-level or look-alike pairs",
    ),
    "- deform pairs": (
        {"pair_kinds": ",".join(k for k in ALL_KINDS if k != "deform")},
        "no elastic-deformation pairs",
    ),
    "baseline, seed 1": (
        {"seed": 1},
        "the baseline again with another seed (subjects, pairs, initialisation): run-to-run noise",
    ),
    "+ InfoNCE ranking": (
        {"ranking_weight": 1.0, "ranking_loss": "infonce"},
        "retrieval loss, softmax: a copy against its own image and neighbouring slices",
    ),
    "+ margin ranking": (
        {"ranking_weight": 1.0, "ranking_loss": "margin"},
        "retrieval loss, hinge: the own image must beat the hardest other by 0.05",
    ),
    "+ margin ranking, frame": (
        {"augmentation": BASE + "+frame", "ranking_weight": 1.0, "ranking_loss": "margin"},
        "the hinge retrieval loss with the frame artefact",
    ),
}
PER_CLASS = 30
TOP_K = 10


def arm_folder(out: Path, arm: str) -> Path:
    """'+ blur, noise, bias' -> OUT/plus-blur-noise-bias."""
    words = arm.replace("+", "plus").replace("- ", "minus ").replace(",", "").split()
    return out / "-".join(words)


def settings_of(arm: str, budget: dict):
    from deepssim.training.train import TrainSettings

    return replace(TrainSettings(augmentation=BASE, **budget), **ARMS[arm][0])


def prepare_data(out: Path, arms: list[str], budget: dict) -> None:
    """Synthesise the pseudo-subjects and sample the pairs once per data variant, and hard-link
    them into each arm's folder (training finds them there and skips both steps)."""
    from deepssim.training.train import prepare_training_data

    for arm in arms:
        if (arm_folder(out, arm) / "metrics.json").exists():
            continue
        settings = settings_of(arm, budget)
        # pseudo-subjects: one set per contrast and seed
        subjects = out / "data" / f"{settings.synthetic_contrast}-seed{settings.seed}"
        variant = subjects / settings.pair_kinds.replace(",", "-")
        variant.mkdir(parents=True, exist_ok=True)
        if (subjects / "all" / "synthetic.npz").exists() and not (variant / "synthetic.npz").exists():
            os.link(subjects / "all" / "synthetic.npz", variant / "synthetic.npz")
        prepare_training_data(settings, variant, progress=True)
        folder = arm_folder(out, arm)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("synthetic.npz", "pairs.npz"):
            if not (folder / name).exists():
                os.link(variant / name, folder / name)


def run_arm(arm: str, out: str, budget: dict, threads: int, seed: int) -> dict:
    """Train one arm (or resume it) and measure it; the result is also kept in ARM/metrics.json."""
    import torch

    torch.set_num_threads(threads)
    from deepssim.embedding.model import DeepSSIM
    from deepssim.training.train import train

    folder = arm_folder(Path(out), arm)
    done = folder / "metrics.json"
    if done.exists():
        return json.loads(done.read_text())
    started = time.perf_counter()
    result = train(None, folder, settings_of(arm, budget))
    seconds = time.perf_counter() - started
    metrics = measure(DeepSSIM.load(result.best_checkpoint), seed)
    metrics.update(
        arm=arm,
        changes=ARMS[arm][0],
        question=ARMS[arm][1],
        best_epoch=result.summary["best_epoch"],
        training_seconds=round(sum(row["seconds"] for row in result.log), 1),
        wall_seconds=round(seconds, 1),
        threads=threads,
    )
    done.write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def measure(model, seed: int) -> dict:
    """The arm's numbers on the leave-one-source-out protocol (see the module docstring)."""
    from generalisation import bundled_sources

    from deepssim.evaluation.generalisation import (
        duplicate_recall,
        macro_f1_held_out,
        misaligned,
        plant_pairs,
        regression,
    )

    sources = bundled_sources()
    pairs = {s.name: plant_pairs(s, [o for o in sources if o is not s], PER_CLASS, seed) for s in sources}
    views = {name: misaligned(p, seed) for name, p in pairs.items()}

    def cosine(a, b):
        return np.sum(model.embed(a) * model.embed(b), axis=1)

    def rank(queries, gallery):
        similarity = model.embed(queries) @ model.embed(gallery).T
        return np.argsort(-similarity, axis=1, kind="stable")[:, :TOP_K]

    out: dict = {"per_source": {}}
    labels = {name: p.labels for name, p in pairs.items()}
    signed: dict = {}
    for setting in ("aligned", "misaligned"):
        scores = {
            name: cosine(*((p.first, p.second) if setting == "aligned" else views[name]))
            for name, p in pairs.items()
        }
        for source in sources:
            p = pairs[source.name]
            f1, _ = macro_f1_held_out(scores, labels, source.name)
            row = out["per_source"].setdefault(source.name, {})
            row[f"macro_f1_{setting}"] = f1
            row[f"mae_{setting}"] = regression(scores[source.name], p.ssim)["mae"]
            for kind in set(p.kinds):
                chosen = np.array(p.kinds) == kind
                signed.setdefault((setting, kind), []).extend((scores[source.name] - p.ssim)[chosen].tolist())
    for source in sources:
        out["per_source"][source.name].update(duplicate_recall(source, rank, PER_CLASS, seed, (1, 5, 10)))
    two_stage = _two_stage(sources, rank, seed)
    for name, f1 in two_stage.items():
        out["per_source"][name]["two_stage_macro_f1"] = f1
    rows = out["per_source"].values()
    for key in next(iter(rows)):
        out[key] = float(np.mean([row[key] for row in rows]))
    out["signed_error_by_kind"] = {
        f"{setting}:{kind}": float(np.mean(values)) for (setting, kind), values in sorted(signed.items())
    }
    out["worst_signed_error"] = max(out["signed_error_by_kind"].values())
    return out


def _two_stage(sources, rank, seed: int) -> dict:
    """Macro-F1 per held-out source of the scan's decision: the arm retrieves each query's top 10
    among the source's images, the best registered SSIM of them is the score, thresholds come
    from the other sources' queries."""
    from deepssim.evaluation.generalisation import macro_f1_held_out
    from deepssim.evaluation.protocol import misaligned_views
    from deepssim.io.normalise import zscore
    from deepssim.labels import Label
    from deepssim.seeds import derived_seed
    from deepssim.ssim.registered import register_pairs
    from deepssim.training.pairs import deform, degrade

    scores, labels = {}, {}
    for source in sources:
        rng = np.random.default_rng(derived_seed(seed, 17, sum(map(ord, source.name))))
        gallery = zscore(source.images.astype(np.float64))
        strangers = zscore(np.concatenate([o.images.astype(np.float64) for o in sources if o is not source]))
        queries, truth = [], []
        for _ in range(PER_CLASS):
            image = gallery[int(rng.integers(len(gallery)))]
            queries.append(degrade(image, int(rng.integers(2**62)), 0.3))
            truth.append(Label.DUPLICATE)
            moved = deform(image, int(rng.integers(2**62)), 3.0)
            queries.append(degrade(moved, int(rng.integers(2**62)), 0.3))
            truth.append(Label.SIMILAR)
            queries.append(strangers[int(rng.integers(len(strangers)))])
            truth.append(Label.DIFFERENT)
        views = misaligned_views(np.stack(queries), derived_seed(seed, 18))
        top = rank(views, gallery)
        registered = register_pairs(gallery[top.ravel()], np.repeat(views, top.shape[1], axis=0))
        scores[source.name] = registered.ssim_registered.reshape(top.shape).max(axis=1)
        labels[source.name] = np.array(truth)
    return {name: macro_f1_held_out(scores, labels, name)[0] for name in scores}


COLUMNS = [  # (key, header, format)
    ("recall_at_1", "recall@1", ".2f"),
    ("recall_at_5", "recall@5", ".3f"),
    ("recall_at_10", "recall@10", ".3f"),
    ("mae_aligned", "MAE aligned", ".3f"),
    ("mae_misaligned", "MAE misaligned", ".3f"),
    ("worst_signed_error", "worst kind's mean signed error", "+.3f"),
    ("macro_f1_aligned", "macro-F1 aligned", ".3f"),
    ("macro_f1_misaligned", "macro-F1 misaligned", ".3f"),
    ("two_stage_macro_f1", "two-stage macro-F1", ".3f"),
    ("training_seconds", "training s", ".0f"),
]


def report(out: Path, results: list[dict], budget: dict, cpu: str) -> None:
    header = "| arm | changes | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [header, "|" + " --- |" * (len(COLUMNS) + 2)]
    for r in results:
        change = ", ".join(f"{k}={v}" for k, v in ARMS[r["arm"]][0].items()) or "-"
        cells = " | ".join(format(r[key], fmt) for key, _, fmt in COLUMNS)
        lines.append(f"| {r['arm']} | {change} | {cells} |")
    kinds = sorted({k for r in results for k in r["signed_error_by_kind"]})
    lines += ["", "Mean signed error (cosine - SSIM) by planted pair kind:", ""]
    lines.append("| arm | " + " | ".join(kinds) + " |")
    lines.append("|" + " --- |" * (len(kinds) + 1))
    for r in results:
        lines.append(
            f"| {r['arm']} | "
            + " | ".join(f"{r['signed_error_by_kind'].get(k, float('nan')):+.3f}" for k in kinds)
            + " |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    summary = {"cpu": cpu, "budget": budget, "arms": results}
    (out / "study.json").write_text(json.dumps(summary, indent=1) + "\n")
    _figure(out / "augmentation_study.png", results)


def _figure(path: Path, results: list[dict]) -> None:
    from matplotlib.figure import Figure

    panels = [
        ("recall_at_1", "recall@1 (misaligned copies)"),
        ("recall_at_5", "recall@5"),
        ("mae_misaligned", "cosine MAE, misaligned"),
        ("macro_f1_misaligned", "cosine macro-F1, misaligned"),
        ("two_stage_macro_f1", "two-stage macro-F1"),
    ]
    figure = Figure(figsize=(16, 0.35 * len(results) + 1.5))
    axes = figure.subplots(1, len(panels), sharey=True)
    names = [r["arm"] for r in results]
    positions = np.arange(len(results))
    baseline = next((r for r in results if r["arm"] == "baseline"), None)
    for axis, (key, title) in zip(axes, panels, strict=True):
        axis.barh(positions, [r[key] for r in results], color="#4c72b0")
        if baseline is not None:
            axis.axvline(baseline[key], color="black", linewidth=0.8, linestyle="--")
        axis.set_title(title, fontsize=9)
        lo = min(r[key] for r in results)
        axis.set_xlim(max(0.0, lo - 0.1 * (1 + lo)), None)
    axes[0].set_yticks(positions, names, fontsize=8)
    axes[0].invert_yaxis()
    figure.suptitle("Augmentation study: every bundled real source held out (mean over 5 sources)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def evaluate_models(models: list[str], out: Path, seed: int) -> None:
    """The study's numbers for finished models (the shipped one, a candidate default), per source too."""
    from deepssim.embedding.model import DeepSSIM
    from deepssim.hardware import cpu_description

    out.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_description()}")
    rows = []
    for model in models:
        metrics = measure(DeepSSIM.load(model), seed)
        rows.append({"model": model, **metrics})
        print(f"{model}: " + ", ".join(f"{h} {metrics[k]:{f}}" for k, h, f in COLUMNS if k in metrics))
    (out / "models.json").write_text(json.dumps(rows, indent=1) + "\n")
    keys = [c for c in COLUMNS if c[0] in rows[0]]
    lines = ["| model | held-out source | " + " | ".join(h for _, h, _ in keys) + " |"]
    lines.append("|" + " --- |" * (len(keys) + 2))
    for row in rows:
        for source, values in [("mean of 5", row), *row["per_source"].items()]:
            cells = " | ".join(format(values[k], f) if k in values else "" for k, _, f in keys)
            lines.append(f"| {row['model']} | {source} | {cells} |")
    (out / "models.md").write_text("\n".join(lines) + "\n")
    print((out / "models.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/augmentation-study")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), metavar="ARM")
    parser.add_argument("--subjects", type=int, default=96, help="pseudo-subjects (every arm)")
    parser.add_argument("--slices", type=int, default=24, help="slices per pseudo-subject")
    parser.add_argument("--pairs", type=int, default=6000, help="training + validation pairs")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="arms trained at once (threads split evenly)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--evaluate",
        nargs="+",
        metavar="MODEL",
        help="instead of the study: measure these models ('default' or checkpoints) the same way",
    )
    args = parser.parse_args()
    import torch

    from deepssim.hardware import cpu_description

    if args.evaluate:
        evaluate_models(args.evaluate, Path(args.out), args.seed)
        return

    out = Path(args.out)
    budget = {
        "synthetic_subjects": args.subjects,
        "slices_per_subject": args.slices,
        "n_pairs": args.pairs,
        "epochs": args.epochs,
        "seed": args.seed,
    }
    cpu = cpu_description()
    print(f"CPU: {cpu}")
    print("budget: " + json.dumps(budget))
    prepare_data(out, args.arms, budget)
    threads = max(1, torch.get_num_threads() // args.jobs)
    context = get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = {arm: pool.submit(run_arm, arm, str(out), budget, threads, args.seed) for arm in args.arms}
        results = []
        for arm, future in futures.items():
            results.append(future.result())
            print(
                f"{arm}: recall@1 {results[-1]['recall_at_1']:.2f}, MAE {results[-1]['mae_misaligned']:.3f}"
            )
    report(out, results, {**budget, "settings": asdict(settings_of("baseline", budget))}, cpu)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
