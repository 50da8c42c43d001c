"""Before and after fitting to a user's training set, on a real source the default model never saw.

    python benchmarks/fit_to_source.py --source itk-t1-volume --minutes 5 --out build/fit-itk

The "user" holds a training set: the held-out source's training part (its axis-1 and axis-2
slices) plus the other bundled real sources as other patients. Evaluation uses the source's
axis-0 slices, which the fit never sees: labelled pairs planted from them
(deepssim.evaluation.generalisation) and misaligned copies for recall.

Before: the default model, the paper's thresholds. After: the model fitted on the training set
only (`deepssim fit`, the time budget given), and label-free thresholds: the Duplicate threshold
at a false-positive rate of 5% from the training images of other groups (conformal). Reported
for the DeepSSIM score (decision "score") and for registered SSIM (the two-stage decision, whose
score a fit does not change): macro-F1, the false-positive rate among different-subject pairs,
MAE of the cosine against SSIM, duplicate recall@1/@5 and the fitting time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

from deepssim.embedding.model import DeepSSIM
from deepssim.evaluation.generalisation import Source, duplicate_recall, misaligned, plant_pairs, regression
from deepssim.execution.search import top_k_other_groups
from deepssim.hardware import cpu_description
from deepssim.labels import Label
from deepssim.scanning.decide import Thresholds, classify, conformal_threshold
from deepssim.ssim.registered import register_pairs
from deepssim.training.fit import FitSettings, describe, fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generalisation import bundled_sources  # noqa: E402

DIFFERENT, DUPLICATE = Label.DIFFERENT, Label.DUPLICATE

RATE = 0.05


def split(source: Source) -> tuple[Source, Source]:
    """(training part: axis 1 and 2 stacks, evaluation part: the axis-0 stack)."""
    held = np.array([stack.endswith("axis0") for stack in source.stacks])

    def part(mask, name):
        rows = np.flatnonzero(mask)
        return Source(
            name,
            source.images[rows],
            [source.stacks[i] for i in rows],
            source.slice_index[rows],
            [source.subjects[i] for i in rows],
        )

    return part(~held, f"{source.name}-train"), part(held, f"{source.name}-eval")


def decisions(scores, labels, thresholds: Thresholds) -> dict:
    predicted = classify(scores, thresholds)
    different = labels == DIFFERENT
    return {
        "macro_f1": float(f1_score(labels, predicted, average="macro")),
        "fpr_different_called_duplicate": float(np.mean(predicted[different] == DUPLICATE)),
        "thresholds": [thresholds.low, thresholds.high],
    }


def null_scores(model: DeepSSIM, images: np.ndarray, groups: list[str], two_stage: bool) -> np.ndarray:
    vectors = model.embed(images, precision="float32")
    scores, nearest = top_k_other_groups(vectors, groups, 5)
    if not two_stage:
        return scores[:, 0]
    rows = np.repeat(np.arange(len(images)), nearest.shape[1])
    registered = register_pairs(images[nearest.ravel()], images[rows]).ssim_registered
    return registered.reshape(nearest.shape).max(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="itk-t1-volume")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="build/fit-to-source")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}")
    sources = bundled_sources()
    source = next(s for s in sources if s.name == args.source)
    others = [s for s in sources if s is not source]
    training_part, evaluation_part = split(source)
    user_images = np.concatenate([training_part.images] + [s.images for s in others])
    user_groups = training_part.subjects + [g for s in others for g in s.subjects]
    user_stacks = training_part.stacks + [st for s in others for st in s.stacks]
    out = Path(args.out)
    folder = out / "train"
    folder.mkdir(parents=True, exist_ok=True)
    for key in sorted(set(zip(user_groups, user_stacks, strict=True))):  # a .npy per stack, in order
        rows = [i for i, gs in enumerate(zip(user_groups, user_stacks, strict=True)) if gs == key]
        np.save(folder / f"{key[0]}__{Path(key[1]).stem}.npy", user_images[rows])
    pairs = plant_pairs(evaluation_part, others, args.per_class, args.seed)
    views = misaligned(pairs, args.seed)
    started = time.perf_counter()
    fitted = fit(folder, out / "fit", settings=FitSettings(minutes=args.minutes, seed=args.seed))
    fit_seconds = time.perf_counter() - started
    print(describe(fitted))
    models = {
        "before (default)": DeepSSIM.load("default"),
        "after (fitted)": DeepSSIM.load(fitted.model_path),
    }
    rows = {}
    registered = {
        s: register_pairs(*((pairs.first, pairs.second) if s == "aligned" else views)).ssim_registered
        for s in ("aligned", "misaligned")
    }
    for name, model in models.items():
        label_free = name.startswith("after")
        row = {}
        cosine_null = null_scores(model, user_images, user_groups, two_stage=False)
        for setting in ("aligned", "misaligned"):
            a, b = (pairs.first, pairs.second) if setting == "aligned" else views
            cosine = np.sum(model.embed(a, precision="float32") * model.embed(b, precision="float32"), axis=1)
            paper = Thresholds(0.6, 0.85, "paper")
            free = Thresholds(0.6, conformal_threshold(cosine_null, RATE), "fpr")
            row[f"deepssim_{setting}"] = decisions(cosine, pairs.labels, free if label_free else paper)
            row[f"deepssim_{setting}"]["mae"] = regression(cosine, pairs.ssim)["mae"]
        if label_free:
            high = conformal_threshold(null_scores(model, user_images, user_groups, two_stage=True), RATE)
        for setting in ("aligned", "misaligned"):
            thresholds = (
                Thresholds(min(0.6, high), high, "fpr") if label_free else Thresholds(0.6, 0.85, "paper")
            )
            row[f"two_stage_{setting}"] = decisions(registered[setting], pairs.labels, thresholds)

        def rank(queries, gallery, model=model):
            similarity = (
                model.embed(queries, precision="float32") @ model.embed(gallery, precision="float32").T
            )
            return np.argsort(-similarity, axis=1, kind="stable")[:, :5]

        row["recall"] = duplicate_recall(evaluation_part, rank, 30, args.seed)
        rows[name] = row
    summary = {
        "cpu": cpu_description(),
        "source": args.source,
        "fit": fitted.report,
        "fit_seconds": fit_seconds,
        "results": rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name, row in rows.items():
        print(name)
        for key, value in row.items():
            print(f"  {key}: {value}")
    print(f"fit: {fit_seconds:.0f} s wall")


if __name__ == "__main__":
    main()
