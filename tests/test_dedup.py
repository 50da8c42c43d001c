"""deduplicate(): near-duplicates within one training set, grouped by the scan's decision."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from deepssim.cli import main
from deepssim.errors import DeepSSIMError
from deepssim.scanning.dedup import _union_find_groups, deduplicate
from tests.helpers import smooth_image


def _save(path, image):
    scaled = (image - image.min()) / np.ptp(image)
    Image.fromarray(np.round(scaled * 65535).astype(np.uint16)).save(path)


def test_planted_duplicates_are_grouped_and_distinct_images_are_not(tmp_path):
    rng = np.random.default_rng(3)
    train = tmp_path / "train"
    train.mkdir()
    originals = [smooth_image(rng, (40, 40)) for _ in range(8)]
    for n, image in enumerate(originals):
        _save(train / f"img{n}.png", image)
    # img0 has a flipped, noisy copy and a chain: img0 ~ dupA, dupA ~ dupB (one group of three)
    _save(train / "dupA.png", originals[0][:, ::-1] + rng.normal(0, 0.5, (40, 40)))
    _save(train / "dupB.png", originals[0][:, ::-1] + rng.normal(0, 0.6, (40, 40)))
    _save(train / "zdup5.png", originals[5] + rng.normal(0, 0.5, (40, 40)))  # a second group

    result = deduplicate(train, out_dir=tmp_path / "out", k=3)

    groups = [sorted(result.keys[i] for i in members) for members in result.groups]
    assert sorted(groups) == [["dupA", "dupB", "img0"], ["img5", "zdup5"]]
    assert result.removed == 3
    assert sorted(result.kept) == ["dupA"] + [f"img{n}" for n in range(8) if n != 0]
    # the representative is the group's first image in the set's (sorted) order
    assert all(result.keys[members[0]] in result.kept for members in result.groups)
    assert all(score > 0.85 for _, _, score in result.pairs)

    with open(tmp_path / "out" / "groups.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["key"] for r in rows} == {"img0", "dupA", "dupB", "img5", "zdup5"}
    assert sum(int(r["representative"]) for r in rows) == 2
    assert all((train / (r["key"] + ".png")).samefile(r["path"]) for r in rows)
    kept = (tmp_path / "out" / "kept.txt").read_text().split()
    assert kept == result.kept
    assert len(list(train.glob("*.png"))) == 11  # nothing moved or deleted
    assert result.threshold == pytest.approx(0.85 + 0.04 * np.log2(128 / 40), abs=1e-4)  # the size's default

    # the command: the same groups, and an existing output folder is not overwritten
    assert (
        main(["dedup", "--train", str(train), "--out", str(tmp_path / "cli"), "-k", "3", "--no-progress"])
        == 0
    )
    assert (tmp_path / "cli" / "kept.txt").read_text().split() == result.kept
    assert (
        main(["dedup", "--train", str(train), "--out", str(train), "--no-progress"]) == 2
    )  # inside the input


def test_distinct_images_form_no_group(tmp_path):
    rng = np.random.default_rng(4)
    images = np.stack([smooth_image(rng, (32, 32)) for _ in range(6)])
    result = deduplicate(_set(images, tmp_path), out_dir=None)
    assert result.groups == [] and result.pairs == [] and len(result.kept) == 6


def test_union_find_joins_chains_and_needs_two_images(tmp_path):
    assert _union_find_groups(6, [(4, 5), (1, 3), (3, 0)]) == [[0, 1, 3], [4, 5]]
    rng = np.random.default_rng(5)
    with pytest.raises(DeepSSIMError, match="at least two"):
        deduplicate(_set(smooth_image(rng, (32, 32))[None], tmp_path), out_dir=None)


def _set(images, folder):
    out = folder / "set"
    out.mkdir(exist_ok=True)
    for n, image in enumerate(images):
        _save(out / f"i{n}.png", image)
    return out
