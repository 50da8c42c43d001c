"""Leave-one-source-out generalisation of every score on the bundled real MRI.

    python benchmarks/generalisation.py --models default build/run/best.safetensors --out build/generalisation

Each bundled real source (one subject or volume, or one collection of 2D slices) is held out in
turn: labelled pairs are planted from it (deepssim.evaluation.generalisation), thresholds are
calibrated on the other sources' pairs, and every score is measured on the held-out source,
aligned and misaligned. A model trained only on synthetic subjects (``deepssim train
--synthetic-subjects``) has seen none of these sources, so one model serves every fold; a model
trained on the bundled MRI (the old default) has seen them all, and its rows are marked so.

Scores: ``ssim`` (plain), ``registered`` (SSIM after the best rigid alignment), and per model
``deepssim`` (the cosine), ``two-stage`` (DeepSSIM retrieves the top 5, registered SSIM decides:
its pair score is the registered SSIM, its retrieval re-ranks DeepSSIM's top 5) and ``mean``
(the mean of the cosine and the registered SSIM).

Writes ``results.csv`` (a row per score, source and setting), ``results.md`` (the tables),
``summary.json`` and ``calibration_MODEL.png`` (mean signed error of the cosine per SSIM decile,
a line per held-out source).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from deepssim.embedding.model import DeepSSIM
from deepssim.evaluation.generalisation import (
    Source,
    duplicate_recall,
    macro_f1_held_out,
    misaligned,
    plant_pairs,
    regression,
)
from deepssim.hardware import cpu_description
from deepssim.ssim.engine import ssim_matrix, ssim_pairs
from deepssim.ssim.registered import register_pairs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))
from build_training_slices import SOURCES, square, volume_stacks  # noqa: E402

VOLUME_SOURCES = {  # source name: (file, axes)
    "itk-t1-volume": ("KmeansTest_T1UCharRaw.nii.gz", (0, 1, 2)),
    "dipy-b0-volume": ("S0_10slices.nii.gz", (2,)),
    "nibabel-anatomical": ("anatomical.nii", (0, 1, 2)),
}
SLICE_SOURCES = {  # source name: {file: subject}
    "antspy-slices": {f"r{n}slice.jpg": f"antspy-r{n}" for n in (16, 27, 30, 62, 64, 85)},
    "itk-brainweb-slices": {
        "BrainT1Slice.png": "brainweb",
        "BrainProtonDensitySlice.png": "brainweb",
        "BrainMidSagittalSlice.png": "itk-sagittal",
    },
}
TOP_K = 5


def bundled_sources() -> list[Source]:
    """Every bundled real source except the MNI template (the synthetic subjects' atlas)."""
    sources = []
    for name, (file, axes) in VOLUME_SOURCES.items():
        images, stacks, index = [], [], []
        for stack_name, stack in volume_stacks(file, axes).items():
            images.append(stack)
            stacks += [stack_name] * len(stack)
            index += list(range(len(stack)))
        sources.append(Source(name, np.concatenate(images), stacks, np.array(index), [name] * len(stacks)))
    for name, files in SLICE_SOURCES.items():
        images = []
        for file in files:
            with Image.open(SOURCES / file) as image:
                images.append(square(np.asarray(image.convert("L"), dtype=np.float64), (1.0, 1.0)))
        sources.append(
            Source(name, np.stack(images), list(files), np.full(len(files), -1), list(files.values()))
        )
    return sources


def systems(models: dict[str, DeepSSIM]) -> dict:
    """score name -> (pair score function, retrieval function)."""

    def registered(a, b):
        return register_pairs(a, b).ssim_registered

    def ssim_rank(queries, gallery):
        return np.argsort(-ssim_matrix(gallery, queries).T, axis=1, kind="stable")[:, :TOP_K]

    out = {"ssim": (ssim_pairs, ssim_rank), "registered": (registered, None)}
    for name, model in models.items():

        def cosine(a, b, model=model):
            return np.sum(model.embed(a, precision="float32") * model.embed(b, precision="float32"), axis=1)

        def rank(queries, gallery, model=model):
            similarity = model.embed(queries, precision="float32") @ model.embed(gallery).T
            return np.argsort(-similarity, axis=1, kind="stable")[:, :TOP_K]

        def rerank(queries, gallery, rank=rank):
            top = rank(queries, gallery)
            pairs = register_pairs(gallery[top.ravel()], np.repeat(queries, top.shape[1], axis=0))
            order = np.argsort(-pairs.ssim_registered.reshape(top.shape), axis=1, kind="stable")
            return np.take_along_axis(top, order, axis=1)

        def mean_rule(a, b, cosine=cosine):
            return 0.5 * (cosine(a, b) + registered(a, b))

        out[f"deepssim:{name}"] = (cosine, rank)
        out[f"two-stage:{name}"] = (registered, rerank)
        out[f"mean:{name}"] = (mean_rule, None)
    return out


def run(models: dict[str, DeepSSIM], out: Path, per_class: int, queries: int, seed: int) -> dict:
    sources = bundled_sources()
    print(f"CPU: {cpu_description()}")
    print("sources: " + ", ".join(f"{s.name} ({len(s.images)} images)" for s in sources))
    pairs = {s.name: plant_pairs(s, [o for o in sources if o is not s], per_class, seed) for s in sources}
    views = {name: misaligned(p, seed) for name, p in pairs.items()}
    rows, timings = [], {}
    for system, (score, retrieve) in systems(models).items():
        started = time.perf_counter()
        for setting in ("aligned", "misaligned"):
            scores = {
                name: score(*((p.first, p.second) if setting == "aligned" else views[name]))
                for name, p in pairs.items()
            }
            labels = {name: p.labels for name, p in pairs.items()}
            for source in sources:
                p = pairs[source.name]
                f1, thresholds = macro_f1_held_out(scores, labels, source.name)
                fit = regression(scores[source.name], p.ssim)
                row = {
                    "score": system,
                    "source": source.name,
                    "setting": setting,
                    "pairs": len(p.labels),
                    "macro_f1": f1,
                    "low": thresholds[0],
                    "high": thresholds[1],
                    "mae": fit["mae"],
                    "rmse": fit["rmse"],
                    "pearson": fit["pearson"],
                    "signed_error_by_decile": fit["signed_error_by_decile"],
                }
                if setting == "misaligned" and retrieve is not None:
                    row.update(duplicate_recall(source, retrieve, queries, seed))
                rows.append(row)
        timings[system] = round(time.perf_counter() - started, 1)
        print(f"{system}: {timings[system]} s")
    out.mkdir(parents=True, exist_ok=True)
    _write(out, rows, models, sources)
    summary = {
        "cpu": cpu_description(),
        "per_class": per_class,
        "queries": queries,
        "seed": seed,
        "sources": {s.name: len(s.images) for s in sources},
        "seconds": timings,
        "rows": rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _write(out: Path, rows: list[dict], models, sources) -> None:
    columns = [
        "score",
        "source",
        "setting",
        "pairs",
        "macro_f1",
        "low",
        "high",
        "mae",
        "rmse",
        "pearson",
        "recall_at_1",
    ]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(
            handle, columns + [f"signed_error_{d}" for d in range(10)], extrasaction="ignore"
        )
        writer.writeheader()
        for row in rows:
            flat = dict(row)
            flat.update({f"signed_error_{d}": v for d, v in enumerate(row["signed_error_by_decile"])})
            writer.writerow(flat)
    lines = [
        "| score | held-out source | macro-F1 aligned | macro-F1 misaligned | MAE aligned | MAE misaligned | "
        "worst signed error, SSIM > 0.5 (aligned / misaligned) | duplicate recall@1 / @5 (misaligned) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    by_key = {(r["score"], r["source"], r["setting"]): r for r in rows}
    for score in dict.fromkeys(r["score"] for r in rows):
        for source in sources:
            a, m = by_key[(score, source.name, "aligned")], by_key[(score, source.name, "misaligned")]
            worst = [_worst_upper(r["signed_error_by_decile"]) for r in (a, m)]
            recall = "" if "recall_at_1" not in m else f"{m['recall_at_1']:.2f} / {m['recall_at_5']:.2f}"
            lines.append(
                f"| {score} | {source.name} | {a['macro_f1']:.3f} | {m['macro_f1']:.3f} | {a['mae']:.3f} | "
                f"{m['mae']:.3f} | {worst[0]:+.3f} / {worst[1]:+.3f} | {recall} |"
            )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    for name in models:
        _calibration_plot(out / f"calibration_{name}.png", rows, f"deepssim:{name}", sources)


def _worst_upper(signed: list[float]) -> float:
    """The signed error of largest magnitude among the deciles above SSIM 0.5."""
    upper = [v for v in signed[5:] if np.isfinite(v)]
    return max(upper, key=abs) if upper else float("nan")


def _calibration_plot(path: Path, rows, score: str, sources) -> None:
    from matplotlib.figure import Figure

    centres = np.arange(0.05, 1.0, 0.1)
    figure = Figure(figsize=(10, 4))
    axes = figure.subplots(1, 2, sharey=True)
    for axis, setting in zip(axes, ("aligned", "misaligned"), strict=True):
        for source in sources:
            row = next(
                r
                for r in rows
                if r["score"] == score and r["source"] == source.name and r["setting"] == setting
            )
            axis.plot(centres, row["signed_error_by_decile"], marker="o", label=source.name)
        axis.axhline(0, color="black", linewidth=0.8)
        axis.axhspan(-0.03, 0.03, color="green", alpha=0.1)
        axis.set_title(f"{score}, {setting}")
        axis.set_xlabel("SSIM of the clean aligned pair (decile centre)")
    axes[0].set_ylabel("mean signed error (cosine - SSIM)")
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["default"], help="'default' or checkpoint paths")
    parser.add_argument("--names", nargs="+", help="a short name per model (default: derived from the path)")
    parser.add_argument("--per-class", type=int, default=30, help="planted pairs per class and source")
    parser.add_argument("--queries", type=int, default=30, help="copies per source for recall@1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="build/generalisation")
    args = parser.parse_args()
    names = args.names or [Path(m).parent.name if m != "default" else "default" for m in args.models]
    models = {name: DeepSSIM.load(model) for name, model in zip(names, args.models, strict=True)}
    run(models, Path(args.out), args.per_class, args.queries, args.seed)
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()
