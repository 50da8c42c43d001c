"""The scan's tables: ``results.csv`` (one row per generated image) and ``pairs.csv`` (one row
per top-k pair). Columns are named after what they hold (the README's table of outputs):

- ``retrieval_score``: the metric's score that retrieved the pair (DeepSSIM's cosine by default);
- ``decision_score``: the score the class comes from (registered SSIM under the two-stage decision,
  else the metric's score);
- ``ssim_registered``, ``transform``, ``ssim``: registered SSIM, the transform it found, plain SSIM;
  with the registration cascade (the default) a pair it did not search has no ``ssim_registered``
  (its transform cell says so, and its decision score is a lower bound of it: its plain SSIM);
- ``best_other_score``: the best decision score of the generated image against a training image of
  another patient (``--group-by``) or another training image, among its top k: the margin a
  reviewer compares the best pair with;
- ``reidentifies`` (with ``reidentify``): the image is closer to its best match's patient than any
  other patient's training image gets to that patient.

Every text cell is written spreadsheet-safe (:func:`deepssim.io.files.escape_cell`). The label
queue still reads ``pairs.csv`` of older versions (a ``score`` column instead of
``decision_score``).
"""

from __future__ import annotations

import csv
import io

import numpy as np

from deepssim.io.files import escape_cell
from deepssim.labels import Label
from deepssim.scanning.decide import classify

NOT_SEARCHED = "not searched (cascade; the decision score is a lower bound)"


def results_csv(result) -> str:
    """One row per generated image: its best pair (class, decision score, margin, evidence), then
    the other top-k pairs."""
    k = result.scores.shape[1]
    header = ["generated_key", "class", "decision_score", "best_other_score"]
    if result.reidentifies is not None:
        header.append("reidentifies")
    header += [
        "top1_train_key",
        "top1_retrieval_score",
        "top1_ssim_registered",
        "top1_transform",
        "top1_ssim",
    ]
    for rank in range(2, k + 1):
        header += [f"top{rank}_train_key", f"top{rank}_retrieval_score", f"top{rank}_ssim_registered"]
    rows = [header]
    decided = result.decision_scores
    for i, key in enumerate(result.generated_keys):
        row = [key, Label(int(result.classes[i])).title, _number(decided[i, 0])]
        row.append(_number(result.best_other_scores[i]) if result.best_other_scores is not None else "")
        if result.reidentifies is not None:
            row.append("yes" if result.reidentifies[i] else "no")
        row += [result.train_keys[result.neighbours[i, 0]], _number(result.scores[i, 0])]
        row += _evidence_cells(result.evidence, i, 0)
        for rank in range(1, k):
            row += [result.train_keys[result.neighbours[i, rank]], _number(result.scores[i, rank])]
            row.append(_evidence_cells(result.evidence, i, rank)[0])
        rows.append(row)
    return _csv(rows)


def pairs_csv(result) -> str:
    """Every top-k pair: generated key, rank, training key, the scores, its class and the evidence."""
    rows = [
        ["generated_key", "rank", "train_key", "retrieval_score", "decision_score", "class"]
        + ["ssim_registered", "transform", "ssim"]
    ]
    decided = result.decision_scores
    pair_classes = classify(np.nan_to_num(decided, nan=-np.inf), result.thresholds)
    for i, key in enumerate(result.generated_keys):
        for rank in range(result.scores.shape[1]):
            row = [
                key,
                rank + 1,
                result.train_keys[result.neighbours[i, rank]],
                _number(result.scores[i, rank]),
            ]
            row += [_number(decided[i, rank]), Label(int(pair_classes[i, rank])).title]
            row += _evidence_cells(result.evidence, i, rank)
            rows.append(row)
    return _csv(rows)


def _csv(rows) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows([escape_cell(cell) for cell in row] for row in rows)
    return buffer.getvalue()


def _number(value) -> str:
    """Six decimals; empty where the value was not computed (NaN)."""
    return "" if value is None or not np.isfinite(value) else f"{value:.6f}"


def _evidence_cells(evidence, *index) -> list[str]:
    """CSV cells of one pair: registered SSIM, transform, plain SSIM (empty where not computed;
    no registered SSIM where the cascade did not search the pair: only a lower bound is known)."""
    if not evidence.has(*index):
        return ["", "", ""]
    if evidence.searched is not None and not evidence.searched[index]:
        return ["", NOT_SEARCHED, _number(evidence.ssim_plain[index])]
    return [
        _number(evidence.ssim_registered[index]),
        evidence.transform_text(*index),
        _number(evidence.ssim_plain[index]),
    ]
