"""How raters agree, and the majority labels that calibration reads.

Fleiss' kappa (Fleiss, 1971) over the pairs that every rater labelled, with a bootstrap interval
over pairs; per-class (specific) agreement; the confusion between raters, pooled over every two
raters; and the majority label of every pair (ties are left out and counted). The paper's test
labels came from three raters with agreement measured the same way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.io.files import write_rows_atomic, write_text_atomic
from deepssim.labelling.store import LABELS, SKIP, LabelStore


def fleiss_kappa(table: np.ndarray) -> float:
    """Fleiss' kappa of a (subjects, categories) table of counts, each row summing to the raters."""
    table = np.asarray(table, dtype=np.float64)
    raters = table.sum(axis=1)
    if len(table) == 0 or np.any(raters != raters[0]) or raters[0] < 2:
        raise DeepSSIMError("Fleiss' kappa needs every pair labelled by the same two or more raters")
    n = raters[0]
    observed = ((table * table).sum(axis=1) - n) / (n * (n - 1))
    shares = table.sum(axis=0) / table.sum()
    chance = float(np.sum(shares**2))
    if chance == 1.0:
        return float("nan")  # every label the same: agreement beyond chance is undefined
    return float((observed.mean() - chance) / (1.0 - chance))


@dataclass
class AgreementReport:
    raters: list[str]
    pairs_in_queue: int
    pairs_labelled: int
    pairs_labelled_by_all: int
    kappa: float | None
    kappa_interval: tuple[float, float] | None
    per_class_agreement: dict[str, float | None]
    confusion: dict[str, dict[str, int]]
    majority_pairs: int
    ties: int
    skips: int

    def to_dict(self) -> dict:
        return asdict(self)


def agreement(
    store: LabelStore, *, bootstrap: int = 1000, seed: int = 0
) -> tuple[AgreementReport, list[dict]]:
    """The agreement report and the majority-label rows (``labelled.csv``) of a labels folder."""
    queue = store.queue()
    current = store.current()
    raters = sorted({rater for rater, _ in current})
    skips = sum(label == SKIP for label in current.values())
    votes = np.zeros((len(queue), len(LABELS)), dtype=np.int64)
    by_rater = {rater: {} for rater in raters}
    for (rater, position), label in current.items():
        if label != SKIP:
            votes[position, LABELS.index(label)] += 1
            by_rater[rater][position] = label
    labelled = votes.sum(axis=1)

    complete = votes[labelled == len(raters)] if len(raters) >= 2 else votes[:0]
    kappa = interval = None
    if len(complete):
        kappa = fleiss_kappa(complete)
        rng = np.random.default_rng(seed)
        draws = [
            fleiss_kappa(complete[rng.integers(0, len(complete), len(complete))]) for _ in range(bootstrap)
        ]
        draws = np.array(draws)[np.isfinite(draws)]
        if len(draws):
            interval = (float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5)))
    per_class = {}
    if len(complete):
        n = len(raters)
        for j, name in enumerate(LABELS):
            denominator = np.sum(complete[:, j] * (n - 1))
            agreeing = np.sum(complete[:, j] * (complete[:, j] - 1))
            per_class[name] = float(agreeing / denominator) if denominator else None
    confusion = {a: dict.fromkeys(LABELS, 0) for a in LABELS}
    for i, first in enumerate(raters):
        for second in raters[i + 1 :]:
            for position in by_rater[first].keys() & by_rater[second].keys():
                a, b = by_rater[first][position], by_rater[second][position]
                confusion[a][b] += 1
                if a != b:
                    confusion[b][a] += 1  # pooled both ways, so the table is symmetric

    rows, ties = [], 0
    for position, pair in enumerate(queue):
        if labelled[position] == 0:
            continue
        best = np.flatnonzero(votes[position] == votes[position].max())
        if len(best) > 1:
            ties += 1
            continue
        name = LABELS[best[0]]
        rows.append(
            {
                "train_key": pair.train_key,
                "generated_key": pair.generated_key,
                "label": name,
                "votes": int(votes[position, best[0]]),
                "raters": int(labelled[position]),
            }
        )
    report = AgreementReport(
        raters=raters,
        pairs_in_queue=len(queue),
        pairs_labelled=int(np.sum(labelled > 0)),
        pairs_labelled_by_all=len(complete),
        kappa=kappa,
        kappa_interval=interval,
        per_class_agreement=per_class,
        confusion=confusion,
        majority_pairs=len(rows),
        ties=ties,
        skips=skips,
    )
    return report, rows


def write_labelled_csv(path, rows: list[dict]) -> None:
    """``labelled.csv`` as calibrate and evaluate read it (label 0 Different, 1 Duplicate, 2 Similar)."""
    if not rows:
        raise DeepSSIMError("no pair has a majority label yet; label some pairs first")
    write_rows_atomic(path, rows)


def summarise(labels, *, bootstrap: int = 1000, seed: int = 0) -> AgreementReport:
    """Write ``agreement.json`` and ``labelled.csv`` into the labels folder; return the report."""
    store = LabelStore.open(labels)
    report, rows = agreement(store, bootstrap=bootstrap, seed=seed)
    write_labelled_csv(store.folder / "labelled.csv", rows)
    write_text_atomic(store.folder / "agreement.json", json.dumps(report.to_dict(), indent=1) + "\n")
    return report
