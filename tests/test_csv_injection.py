"""CSV files are safe to open in a spreadsheet (OWASP CSV injection): text cells that begin with
= + - @, a tab or a carriage return are written with a leading quote, numbers stay numbers, and
the readers give every key back unchanged."""

from __future__ import annotations

import csv
import itertools
import json

import pytest

from deepssim.io.files import FORMULA_STARTS, escape_cell, unescape_cell, write_rows_atomic
from deepssim.labelling import LabelStore
from deepssim.labelling.agreement import agreement, write_labelled_csv
from deepssim.labelling.queue import QueuedPair, ScanPairs
from deepssim.training.pairs import read_pair_csv

HOSTILE = ["=1+2", "@SUM(A1)", "+x", "-y", "\tz", "\r=cmd", '=HYPERLINK("http://x")']


@pytest.mark.parametrize("key", HOSTILE)
def test_formula_starts_are_quoted_and_come_back(key):
    assert escape_cell(key) == "'" + key
    assert unescape_cell(escape_cell(key)) == key


def test_numbers_and_plain_text_are_left_alone():
    for value in (-0.5, 3, None, "-0.5", "+1e-3", "-inf", "nan", "0.25", "scan_01", "sub-01", "", "'quoted"):
        assert escape_cell(value) == value
        assert unescape_cell(value) == value
    assert unescape_cell("'-0.5") == "'-0.5"  # escape_cell never writes this, so it is text
    assert unescape_cell("'plain") == "'plain"


def test_every_short_string_round_trips_and_none_starts_a_formula():
    alphabet = "'=+-@\t\r0.e1x"
    for length in range(5):
        for letters in itertools.product(alphabet, repeat=length):
            text = "".join(letters)
            written = escape_cell(text)
            assert unescape_cell(written) == text, repr(text)
            if written.startswith(FORMULA_STARTS):  # only a signed number may start like a formula
                assert written[0] in "+-", repr(text)
                float(written)
    assert unescape_cell(escape_cell("'" * 5000 + "=x")) == "'" * 5000 + "=x"  # no recursion


def _cells(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_write_rows_atomic_quotes_keys_and_read_pair_csv_gives_them_back(tmp_path):
    rows = [
        {"train_key": key, "generated_key": f"g{n}", "label": 1, "score": -0.5, "split": "test"}
        for n, key in enumerate(HOSTILE)
    ]
    rows.append(
        {"train_key": "'=already", "generated_key": "-", "label": 0, "score": -1e-3, "split": "calib"}
    )
    path = tmp_path / "pairs.csv"
    write_rows_atomic(path, rows)
    cells = _cells(path)
    assert cells[0] == ["train_key", "generated_key", "label", "score", "split"]
    assert [row[0] for row in cells[1:]] == ["'" + key for key in HOSTILE] + ["''=already"]
    assert cells[-1][1] == "'-"
    assert {row[3] for row in cells[1:]} == {"-0.5", "-0.001"}  # numbers are written as numbers
    read = read_pair_csv(path)
    assert [r["train_key"] for r in read] == HOSTILE + ["'=already"]
    assert read[-1]["generated_key"] == "-" and read[0]["score"] == "-0.5"


def test_labelled_csv_round_trips_hostile_keys(tmp_path):
    """deepssim label --summary writes labelled.csv; calibrate and evaluate read it back."""
    pairs = [QueuedPair(key, f"@gen{n}", 0.5, "") for n, key in enumerate(HOSTILE)]
    store = LabelStore.create(tmp_path, pairs, {"scan": "one"})
    for n in range(len(pairs)):
        store.record("ann", n, "Duplicate")
    _, rows = agreement(store)
    write_labelled_csv(tmp_path / "labelled.csv", rows)
    assert [row[:2] for row in _cells(tmp_path / "labelled.csv")[1:]] == [
        ["'" + key, f"'@gen{n}"] for n, key in enumerate(HOSTILE)
    ]
    read = read_pair_csv(tmp_path / "labelled.csv")
    assert [(r["train_key"], r["generated_key"]) for r in read] == [
        (p.train_key, p.generated_key) for p in pairs
    ]


def test_the_label_queue_reads_quoted_scan_keys(tmp_path):
    rows = [{"generated_key": "=1+2", "rank": 1, "train_key": "-y", "score": 0.5, "class": "Similar"}]
    write_rows_atomic(tmp_path / "pairs.csv", rows)
    audit = {
        "settings": {"decision": "single-stage", "thresholds": {"low": 0.4, "high": 0.8}, "loading": {}},
        "inputs": {"training": {"given": ["t"]}, "generated": {"given": ["g"]}},
    }
    (tmp_path / "summary.json").write_text(json.dumps({"audit": audit}))
    (pair,) = ScanPairs.read(tmp_path).pairs
    assert (pair.train_key, pair.generated_key, pair.score) == ("-y", "=1+2", 0.5)
