"""The Ray engine on a local Ray instance: the same outputs as the local engine, embedding shards
that resume after a worker is killed, and distributed exact SSIM."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import ray

from deepssim import scan
from deepssim.cli import main
from deepssim.execution.ray_engine import RayEngine
from deepssim.io.load import ImageSet
from deepssim.metrics.deepssim_metric import DeepSSIMMetric
from deepssim.ssim.matrix import compute_ssim_matrix
from tests.helpers import EXAMPLE, read_csv


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _assert_same_tables(local: Path, distributed: Path, name: str) -> None:
    a, b = read_csv(local / name), read_csv(distributed / name)
    assert len(a) == len(b) and list(a[0]) == list(b[0])
    for x, y in zip(a, b, strict=True):
        for column, value in x.items():
            try:
                assert float(value) == pytest.approx(float(y[column]), abs=1e-5), (name, column)
            except ValueError:
                assert value == y[column], (name, column)  # keys, classes, transforms


def test_ray_scan_writes_what_the_local_scan_writes(tmp_path, local_ray):
    groups = "^(ants_r[0-9]+|kmeans|mni|itk_[a-z0-9]+|dwi)"
    train, generated = EXAMPLE / "train", EXAMPLE / "generated"
    scan(train, generated, precision="float32", cache=False, group_by=groups).save(tmp_path / "local")
    command = ["scan", "--train", str(train), "--generated", str(generated), "--out", str(tmp_path / "ray")]
    options = ["--precision", "float32", "--no-cache", "--group-by", groups, "--no-progress"]
    engine = ["--engine", "ray", "--workers", "2", "--shard-size", "8"]
    assert main(command + options + engine) == 0  # the command line, on the running Ray instance
    for name in ("results.csv", "pairs.csv", "groups.csv"):
        _assert_same_tables(tmp_path / "local", tmp_path / "ray", name)
    a, b = (json.loads((tmp_path / side / "summary.json").read_text()) for side in ("local", "ray"))
    for key in ("generated_by_class", "training_images_with_a_duplicate", "groups", "thresholds"):
        assert a[key] == b[key]
    assert b["audit"]["settings"]["engine"]["engine"] == "ray"
    assert (tmp_path / "ray" / "report.html").stat().st_size > 0
    shards = tmp_path / "ray.embeddings-parquet"  # beside --out, which is written whole at the end
    assert len(list(shards.rglob("*.parquet"))) == 5  # 16 + 18 images, 8 per shard


def test_killed_worker_costs_at_most_one_shard_and_reruns_embed_only_new_images(tmp_path, local_ray):
    calls, marker = tmp_path / "calls.txt", tmp_path / "killed"

    class Fragile(DeepSSIMMetric):
        """The default model, logging every shard it embeds and dying once, mid-job."""

        def embed(self, images, batch_size=64, precision="float32", progress=False):
            with open(calls, "a") as handle:
                handle.write(f"{len(images)}\n")
            if len(calls.read_text().split()) == 3 and not marker.exists():
                marker.touch()
                os._exit(1)  # the worker process dies, as if killed
            return super().embed(images, batch_size, precision, progress)

    train = tmp_path / "train"
    shutil.copytree(EXAMPLE / "train", train)
    engine = RayEngine(workers=2, shard_dir=tmp_path / "shards", shard_size=4)
    reference = DeepSSIMMetric()
    images = ImageSet.from_paths(train)
    first = engine.embedder(Fragile(), precision="float32")(images, "training")
    assert marker.exists()  # a worker did die
    shards = 4  # 16 images, 4 per shard
    assert len(calls.read_text().split()) <= shards + 1
    np.testing.assert_allclose(first, reference.embed(images.read(), precision="float32"), atol=1e-5)

    calls.write_text("")
    assert np.array_equal(
        engine.embedder(Fragile(), precision="float32")(ImageSet.from_paths(train), "training"), first
    )
    assert calls.read_text() == ""  # everything came from the shards

    shutil.copy(EXAMPLE / "generated" / "gen_copy_0.png", train / "zz_new.png")
    again = engine.embedder(Fragile(), precision="float32")(ImageSet.from_paths(train), "training")
    assert calls.read_text().split() == ["1"]  # only the new image was embedded
    assert np.array_equal(again[:16], first)


def test_ssim_matrix_on_ray_equals_local(local_ray):
    local = compute_ssim_matrix(EXAMPLE / "train", EXAMPLE / "generated", dtype="float64")
    engine = RayEngine(workers=2)
    distributed = compute_ssim_matrix(
        EXAMPLE / "train", EXAMPLE / "generated", dtype="float64", block_size=7, engine=engine
    )
    assert distributed.train_keys == local.train_keys and distributed.generated_keys == local.generated_keys
    np.testing.assert_allclose(distributed.values, local.values, atol=1e-12)
