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
from deepssim.ssim.registered import transform_text

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
    train = _train_keys(result)
    scores = _numbers(result.scores).reshape(-1, k)
    registered, transform, plain = (column.reshape(-1, k) for column in _evidence_columns(result.evidence))
    decided = _numbers(result.decision_scores[:, 0])
    other = _numbers(result.best_other_scores) if result.best_other_scores is not None else None
    titles = Label.titles()
    rows = [header]
    for i, key in enumerate(_escaped(result.generated_keys)):
        row = [key, titles[result.classes[i]], decided[i], "" if other is None else other[i]]
        if result.reidentifies is not None:
            row.append("yes" if result.reidentifies[i] else "no")
        row += [train[i, 0], scores[i, 0], registered[i, 0], transform[i, 0], plain[i, 0]]
        for rank in range(1, k):
            row += [train[i, rank], scores[i, rank], registered[i, rank]]
        rows.append(row)
    return _csv(rows)


def pairs_csv(result) -> str:
    """Every top-k pair: generated key, rank, training key, the scores, its class and the evidence."""
    header = ["generated_key", "rank", "train_key", "retrieval_score", "decision_score", "class"]
    header += ["ssim_registered", "transform", "ssim"]
    m, k = result.scores.shape
    decided = result.decision_scores
    pair_classes = classify(np.nan_to_num(decided, nan=-np.inf), result.thresholds)
    columns = [
        np.repeat(np.asarray(_escaped(result.generated_keys), dtype=object), k),
        np.tile(np.arange(1, k + 1), m),
        _train_keys(result).ravel(),
        _numbers(result.scores),
        _numbers(decided),
        np.asarray(Label.titles(), dtype=object)[pair_classes.ravel()],
        *_evidence_columns(result.evidence),
    ]
    return _csv([header, *zip(*(column.tolist() for column in columns), strict=True)])


# Columns are built whole (a cell at a time was ~30 s of a scan at the paper's scale). Only keys
# are text a spreadsheet could misread: numbers, classes and transforms never need escaping.


def _csv(rows) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def _escaped(keys: list[str]) -> list[str]:
    return [escape_cell(key) for key in keys]


def _train_keys(result) -> np.ndarray:
    """(M, k) the escaped training key of every top-k pair."""
    return np.asarray(_escaped(result.train_keys), dtype=object)[result.neighbours]


def _numbers(values) -> np.ndarray:
    """Six decimals per value (flattened); empty where the value was not computed (NaN)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    cells = ["" if v != v or v in (np.inf, -np.inf) else f"{v:.6f}" for v in values.tolist()]
    return np.asarray(cells, dtype=object)


def _evidence_columns(evidence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSV cells of every pair (flattened): registered SSIM, transform, plain SSIM. Empty where
    not computed; no registered SSIM where the cascade did not search the pair (only a lower bound
    is known: its plain SSIM)."""
    registered = np.asarray(evidence.ssim_registered, dtype=np.float64).ravel()
    has = np.isfinite(registered)
    searched = has if evidence.searched is None else has & np.asarray(evidence.searched).ravel()
    transform = np.full(len(registered), "", dtype=object)
    transform[has & ~searched] = NOT_SEARCHED
    flip, rotation, scale, gamma = (
        np.asarray(values).ravel()[searched].tolist()
        for values in (evidence.flip, evidence.rotation_deg, evidence.scale, evidence.gamma)
    )
    shift = np.asarray(evidence.shift_px, dtype=np.float64).reshape(-1, 2)[searched].tolist()
    transform[searched] = [
        transform_text(*values) for values in zip(flip, rotation, shift, scale, gamma, strict=True)
    ]
    plain = np.where(has, np.asarray(evidence.ssim_plain, dtype=np.float64).ravel(), np.nan)
    return _numbers(np.where(searched, registered, np.nan)), transform, _numbers(plain)
