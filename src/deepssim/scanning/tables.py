"""The scan's tables: ``results.csv`` (one row per generated image) and ``pairs.csv`` (one row
per top-k pair). Their columns are documented in the README's table of outputs."""

from __future__ import annotations

import csv
import io

import numpy as np

from deepssim.labels import Label
from deepssim.scanning.decide import classify


def results_csv(result) -> str:
    """One row per generated image: its best match, score, class, the evidence and the top-k."""
    k = result.scores.shape[1]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["generated_key", "top1_train_key", "score", "class"]
    if result.evidence is not None:
        header += ["top1_ssim_registered", "top1_transform", "top1_ssim"]
    for rank in range(2, k + 1):
        header += [f"top{rank}_train_key", f"top{rank}_score"]
    writer.writerow(header)
    for i, key in enumerate(result.generated_keys):
        row = [key, result.train_keys[result.neighbours[i, 0]], f"{result.scores[i, 0]:.6f}"]
        row.append(Label(int(result.classes[i])).title)
        if result.evidence is not None:
            row += _evidence_cells(result.evidence, i, 0)
        for rank in range(1, k):
            row += [result.train_keys[result.neighbours[i, rank]], f"{result.scores[i, rank]:.6f}"]
        writer.writerow(row)
    return buffer.getvalue()


def pairs_csv(result) -> str:
    """Every top-k pair: generated key, rank, training key, score, class (and the evidence)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["generated_key", "rank", "train_key", "score", "class"]
    writer.writerow(
        header + (["ssim_registered", "transform", "ssim"] if result.evidence is not None else [])
    )
    pair_classes = classify(np.nan_to_num(result.decision_scores, nan=-np.inf), result.thresholds)
    for i, key in enumerate(result.generated_keys):
        for rank in range(result.scores.shape[1]):
            row = [
                key,
                rank + 1,
                result.train_keys[result.neighbours[i, rank]],
                f"{result.scores[i, rank]:.6f}",
            ]
            row.append(Label(int(pair_classes[i, rank])).title)
            if result.evidence is not None:
                row += _evidence_cells(result.evidence, i, rank)
            writer.writerow(row)
    return buffer.getvalue()


def _evidence_cells(evidence, *index) -> list[str]:
    """CSV cells of one pair: registered SSIM, transform, plain SSIM (empty where not computed)."""
    if not evidence.has(*index):
        return ["", "", ""]
    return [
        f"{evidence.ssim_registered[index]:.6f}",
        evidence.transform_text(*index),
        f"{evidence.ssim_plain[index]:.6f}",
    ]
