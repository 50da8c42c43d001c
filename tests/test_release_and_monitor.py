"""The release filter (scan --release-dir) and the memorisation monitor for training loops."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from deepssim import scan
from deepssim.cli import main
from deepssim.errors import DeepSSIMError
from deepssim.io.load import load_images
from deepssim.labels import Label
from deepssim.metrics import SimilarityMetric
from deepssim.monitor import MemorisationMonitor
from deepssim.scanning import release as release_module
from deepssim.scanning.release import write_release
from tests.helpers import EXAMPLE, planted, smooth_image


def test_release_copies_only_what_passes(tmp_path, capsys):
    out, released = tmp_path / "scan", tmp_path / "release"
    command = ["scan", "--train", str(EXAMPLE / "train"), "--generated", str(EXAMPLE / "generated")]
    command += ["--out", str(out), "--no-cache", "--no-progress", "--release-dir", str(released)]
    assert main(command) == 0
    assert "release:" in capsys.readouterr().out
    with open(released / "release.csv", newline="") as handle:
        rows = {row["generated_key"]: row for row in csv.DictReader(handle)}
    with open(out / "results.csv", newline="") as handle:
        classes = {row["generated_key"]: row["class"] for row in csv.DictReader(handle)}
    assert set(rows) == set(classes) == set({key: row["kind"] for key, row in planted().items()})
    for key, kind in {key: row["kind"] for key, row in planted().items()}.items():
        copy = released / f"{key}.png"
        if kind.startswith("duplicate"):  # every planted copy is held back ...
            assert not copy.exists() and rows[key]["released"] == "no"
        if classes[key] != "Duplicate":  # ... and everything else goes out, byte for byte
            assert copy.read_bytes() == (EXAMPLE / "generated" / f"{key}.png").read_bytes()
        assert (EXAMPLE / "generated" / f"{key}.png").exists()  # copied, never moved
    summary = json.loads((released / "release.json").read_text())
    assert summary["released_images"] == sum(c != "Duplicate" for c in classes.values())
    assert summary["model"]["fingerprint_sha256"] and summary["thresholds"]["high"] == 0.85

    assert main(command) == 2  # a release never overwrites one
    assert "already exists" in capsys.readouterr().err

    strict = tmp_path / "strict"
    assert main(command[:-1] + [str(strict), "--release-drop", "similar", "--overwrite"]) == 0
    kept = {p.stem for p in strict.glob("*.png")}
    assert kept == {key for key, name in classes.items() if name == "Different"}


def test_release_is_complete_or_absent_and_drops_whole_multi_image_files(tmp_path, monkeypatch):
    keys, train = load_images(EXAMPLE / "train")
    generated = tmp_path / "generated"
    generated.mkdir()
    rng = np.random.default_rng(0)
    np.save(generated / "volume.npy", np.stack([train[3], smooth_image(rng, train.shape[1:])]))
    np.save(generated / "other.npy", smooth_image(rng, train.shape[1:])[None])
    result = scan(EXAMPLE / "train", generated, cache=False)
    summary = write_release(result, tmp_path / "release")
    with open(tmp_path / "release" / "release.csv", newline="") as handle:
        rows = {row["generated_key"]: row for row in csv.DictReader(handle)}
    assert rows["volume#0"]["class"] == "Duplicate" and rows["volume#1"]["released"] == "no"
    assert "volume#0" in rows["volume#1"]["reason"]
    assert sorted(p.name for p in (tmp_path / "release").iterdir()) == [
        "other.npy",
        "release.csv",
        "release.json",
    ]
    assert summary["released_files"] == 1

    def broken_copy(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(release_module.shutil, "copy2", broken_copy)
    with pytest.raises(OSError):
        write_release(result, tmp_path / "second")
    assert not (tmp_path / "second").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".second")]  # no partial folder


def test_monitor_flags_a_copying_generator_and_not_a_novel_one(tmp_path):
    keys, train = load_images(EXAMPLE / "train")
    log = tmp_path / "memorisation.csv"
    monitor = MemorisationMonitor(EXAMPLE / "train", every=5, samples=6, stop_share=0.5, log=log)
    rng = np.random.default_rng(1)

    def copying(n):  # noisy, flipped copies of training images
        chosen = rng.choice(len(train), n, replace=False)
        return train[chosen][:, :, ::-1] + rng.normal(0, 3, (n, *train.shape[1:]))

    def novel(n):
        return np.stack([smooth_image(rng, train.shape[1:]) for _ in range(n)])

    assert monitor(3, copying).stop is False  # not due: nothing sampled
    caught = monitor(5, copying)
    assert caught.stop and caught.duplicate_share == 1.0 and caught.groups_hit == 6
    calm = monitor(10, novel)
    assert not calm.stop and calm.duplicate_share == 0.0 and calm.best_max < 0.6
    with open(log, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [5, 10]

    # the monitor's decision is the scan's two-stage decision on the same images
    images = copying(4)
    generated = tmp_path / "generated"
    generated.mkdir()
    np.save(generated / "samples.npy", images)
    shares = scan(EXAMPLE / "train", generated, cache=False).summary.generated_by_class
    assert monitor.check(11, images).duplicate_share == shares["Duplicate"]["share"]


def test_monitor_stops_diffusion_training_from_the_command_line(tmp_path, capsys):
    from deepssim.experiments.ldm import train_vae

    tiny = {"image_size": (32, 32), "vae_epochs": 1, "vae_batch_size": 8, "diffusion_batch_size": 8}
    run = train_vae(EXAMPLE / "train", tmp_path / "run", "small", "none", **tiny)
    command = ["ldm", "train-diffusion", "--images", str(EXAMPLE / "train"), "--run", str(run)]
    command += ["--epochs", "1", "--monitor-every", "1", "--monitor-samples", "2", "--no-progress"]
    assert main(command) == 0
    with open(run / "memorisation.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2]  # 16 images, batches of 8: two steps, two checks
    assert "memorisation at step 2" in capsys.readouterr().out
    shutil.rmtree(run)


class _BlindMetric(SimilarityMetric):
    """An embedding that ignores the anatomy (a random unit vector per image): its top k misses
    copies, as a real retriever does for copies unlike anything it trained on."""

    is_embedding = True
    thresholds = (0.6, 0.85)
    description = "blind"

    def embed(self, images, batch_size=64, precision="float32", progress=False):
        vectors = [
            np.random.default_rng(int(np.asarray(image, dtype=np.float64).sum() * 1e6) % 2**32).normal(size=8)
            for image in images
        ]
        return np.stack([v / np.linalg.norm(v) for v in vectors]).astype(np.float32)


def test_the_exact_check_holds_back_a_copy_the_retriever_missed(tmp_path):
    rng = np.random.default_rng(7)
    train = load_images(EXAMPLE / "train")[1]
    copy = np.zeros_like(train[4])  # a shifted copy with a bright frame, as a generator drew it
    copy[2:, :-1] = train[4][:-2, 1:]
    copy[0, :] = copy[-1, :] = copy[:, 0] = copy[:, -1] = np.percentile(train[4], 99)
    generated = np.stack([copy, *(smooth_image(rng, train.shape[1:]) for _ in range(3))])
    for name, images in (("train", train), ("generated", generated)):
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            np.save(tmp_path / name / f"{name}{i:02d}.npy", image)
    result = scan(tmp_path / "train", tmp_path / "generated", metric=_BlindMetric(), k=1, cache=False)
    assert result.train_keys[result.neighbours[0, 0]] != "train04"  # the retriever missed the source
    assert int(result.classes[0]) != Label.DUPLICATE

    unchecked = write_release(result, tmp_path / "unchecked", check="none")
    assert (tmp_path / "unchecked" / "generated00.npy").exists()  # without the check the copy leaks
    assert unchecked["exact_check"] is None

    summary = write_release(result, tmp_path / "release", manifest=tmp_path / "manifest.csv")
    assert not (tmp_path / "release" / "generated00.npy").exists()
    assert sorted(p.name for p in (tmp_path / "release").glob("*.npy")) == [
        "generated01.npy",
        "generated02.npy",
        "generated03.npy",
    ]
    with open(tmp_path / "manifest.csv", newline="") as handle:
        rows = {row["generated_key"]: row for row in csv.DictReader(handle)}
    assert rows["generated00"]["class"] == "Duplicate" and "exact check" in rows["generated00"]["reason"]
    assert rows["generated00"]["nearest_train_key"] == "train04"
    assert float(rows["generated00"]["score"]) > 0.85
    check = summary["exact_check"]
    assert check["images_checked"] == 4 and check["images_dropped"] == 1
    assert check["thresholds"]["score"] == "registered-ssim"
    with pytest.raises(DeepSSIMError, match="release check"):
        write_release(result, tmp_path / "bad", check="maybe")


def test_exact_top_k_finds_flipped_copies_and_agrees_with_the_ssim_matrix():
    from skimage.metrics import structural_similarity

    from deepssim.scanning.retrieve import exact_top_k

    rng = np.random.default_rng(3)
    train = np.stack([smooth_image(rng, (24, 20)) for _ in range(9)])
    generated = np.stack([train[2][::-1], train[5][:, ::-1], smooth_image(rng, (24, 20))])
    scores, indices = exact_top_k(train, generated, 3, chunk=2)
    assert indices[0, 0] == 2 and indices[1, 0] == 5
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert all(len(set(row)) == 3 for row in indices.tolist())  # each training image once

    def z(image):
        return (image - image.mean()) / image.std()

    def reference(t, g):  # skimage's SSIM on z-scored images, data range of the training image
        best = -1.0
        for flipped in (g, g[::-1], g[:, ::-1], g[::-1, ::-1]):
            zt = z(t)
            value = structural_similarity(zt, z(flipped), data_range=np.ptp(zt), win_size=7)
            best = max(best, value)
        return best

    expected = [reference(train[i], generated[2]) for i in range(len(train))]
    assert sorted(indices[2].tolist()) == sorted(np.argsort(expected)[::-1][:3].tolist())
    np.testing.assert_allclose(scores[2], np.sort(expected)[::-1][:3], atol=1e-4)


def test_exact_candidates_let_the_scan_itself_decide_a_copy_the_retriever_missed(tmp_path):
    train = load_images(EXAMPLE / "train")[1]
    copy = np.zeros_like(train[4])
    copy[2:, :-1] = train[4][:-2, 1:]
    copy[0, :] = copy[-1, :] = copy[:, 0] = copy[:, -1] = np.percentile(train[4], 99)
    (tmp_path / "generated").mkdir()
    np.save(tmp_path / "generated" / "copy.npy", copy)
    blind = scan(EXAMPLE / "train", tmp_path / "generated", metric=_BlindMetric(), k=1, cache=False)
    assert int(blind.classes[0]) != Label.DUPLICATE  # the retriever alone misses it
    found = scan(
        EXAMPLE / "train", tmp_path / "generated", metric=_BlindMetric(), k=1, exact_candidates=2, cache=False
    )
    assert found.neighbours.shape == (1, 3)  # the retrieved one and two exact-SSIM candidates
    assert int(found.classes[0]) == Label.DUPLICATE and found.train_keys[found.neighbours[0, 0]] == "ants_r64"
    with pytest.raises(DeepSSIMError, match="already searches every pair"):
        scan(EXAMPLE / "train", tmp_path / "generated", metric="ssim", exact_candidates=2, cache=False)
