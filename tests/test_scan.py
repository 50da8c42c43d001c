"""The scan: search, classes, summary, cache, verification, calibration, outputs and report."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score

from deepssim import DeepSSIMError, load_images
from deepssim.cli import main
from deepssim.execution.search import top_k_embeddings
from deepssim.labels import Label
from deepssim.scanning.decide import Thresholds, calibrate, classify, wilson_interval
from deepssim.scanning.scan import scan
from tests.helpers import EXAMPLE, read_csv, smooth_image
from tests.test_model import fast_model
from tests.test_ssim import reference_matrix

TRAIN, SYNTHETIC = EXAMPLE / "train", EXAMPLE / "generated"


@pytest.fixture(scope="module")
def model():
    return fast_model(seed=3)


def test_search_methods_agree_with_brute_force(rng):
    database = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    full = queries @ database.T
    expected = np.argsort(-full, axis=1)[:, :5]
    for method in ("exact", "faiss"):
        scores, indices = top_k_embeddings(queries, database, 5, method, block_bytes=4 * 300 * 7)
        np.testing.assert_array_equal(indices, expected)
        np.testing.assert_allclose(scores, np.take_along_axis(full, expected, 1), atol=1e-5)
    _, approximate = top_k_embeddings(queries, database, 5, "faiss-hnsw")
    assert (approximate[:, 0] == expected[:, 0]).mean() >= 0.9
    with pytest.raises(DeepSSIMError, match="unknown search"):
        top_k_embeddings(queries, database, 5, "annoy")


def test_classes_follow_the_paper_rule():
    thresholds = Thresholds(0.6, 0.85)
    different, similar, duplicate = Label.DIFFERENT, Label.SIMILAR, Label.DUPLICATE
    expected = [different, different, similar, similar, duplicate]
    assert classify([0.2, 0.6, 0.6001, 0.85, 0.8501], thresholds).tolist() == expected
    with pytest.raises(DeepSSIMError, match="must not exceed"):
        Thresholds(0.9, 0.5)


def test_partial_thresholds_take_the_metric_defaults():
    result = scan(TRAIN, SYNTHETIC, metric="ssim", thresholds=(None, 0.9))
    assert (result.thresholds.low, result.thresholds.high, result.thresholds.source) == (0.6, 0.9, "set")
    from deepssim.metrics.pixel import FSIMMetric
    from deepssim.scanning.scan import resolve_thresholds

    with pytest.raises(DeepSSIMError, match="no published thresholds"):
        resolve_thresholds((0.5, None), "fsim", (8, 8), FSIMMetric(), None, use_reference_threshold=False)
    assert (
        resolve_thresholds((0.5, None), "fsim", (8, 8), FSIMMetric(), None, use_reference_threshold=True)
        is None
    )


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Table I: 0/10 -> 0-0.2775; 15/148 -> 0.0624-0.1605
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)


def test_calibration_maximises_macro_f1_like_scikit_learn(rng):
    labels = np.repeat([Label.DIFFERENT, Label.SIMILAR, Label.DUPLICATE], 30)
    scores = np.concatenate(
        [rng.uniform(0, 0.5, 30), rng.uniform(0.45, 0.8, 30), rng.uniform(0.75, 0.99, 30)]
    )
    thresholds, f1 = calibrate(scores, labels)
    assert f1 == pytest.approx(f1_score(labels, classify(scores, thresholds), average="macro"))
    grid = np.linspace(0, 0.99, 100)  # thresholds of 1 or more are refused: no score exceeds 1
    brute = max(
        f1_score(labels, classify(scores, Thresholds(lo, hi)), average="macro")
        for lo in grid
        for hi in grid
        if lo <= hi
    )
    assert f1 >= brute - 1e-12


def test_ssim_scan_matches_scikit_image(tmp_path):
    result = scan(TRAIN, SYNTHETIC, metric="ssim", decision="score", k=3, verify=True)
    _, train = load_images(TRAIN)
    _, fake = load_images(SYNTHETIC)
    expected = reference_matrix(train, fake).T  # (generated, training)
    best = np.sort(expected, axis=1)[:, ::-1][:, :3]
    np.testing.assert_allclose(result.scores, best, atol=1e-4)
    np.testing.assert_allclose(result.evidence.ssim_plain, best, atol=1e-6)
    assert (result.evidence.ssim_registered >= result.evidence.ssim_plain - 1e-9).all()
    planted = {row["generated_key"]: row for row in read_csv(EXAMPLE / "planted.csv")}
    copies = [i for i, key in enumerate(result.generated_keys) if planted[key]["kind"] == "duplicate"]
    assert len(copies) == 6
    for i in copies:
        assert result.classes[i] == Label.DUPLICATE
        source = planted[result.generated_keys[i]]["source_train_key"]
        assert result.train_keys[result.neighbours[i, 0]] == source


def test_deepssim_scan_outputs_and_summary(tmp_path, model):
    result = scan(
        TRAIN, SYNTHETIC, model=model, decision="score", k=4, cache=False, verify=True, precision="float32"
    )
    matrix = model.matrix(load_images(TRAIN)[1], load_images(SYNTHETIC)[1]).T
    np.testing.assert_allclose(result.scores, np.sort(matrix, axis=1)[:, ::-1][:, :4], atol=1e-5)
    files = result.save(tmp_path / "out")
    rows = read_csv(files["results"])
    assert [r["generated_key"] for r in rows] == result.generated_keys
    assert len(read_csv(files["pairs"])) == 18 * 4
    summary = json.loads(files["summary"].read_text())
    counts = [entry["count"] for entry in summary["generated_by_class"].values()]
    assert sum(counts) == 18
    assert summary["generated_by_class"]["Duplicate"]["count"] == int((result.scores[:, 0] > 0.85).sum())
    memorised = int((matrix.max(axis=0) > 0.85).sum())  # training images with any Duplicate
    assert summary["training_images_with_a_duplicate"]["count"] == memorised
    html = files["report"].read_text()
    assert "id='summary-table'" in html and "data:image/png;base64" in html


def test_reference_threshold_is_the_95th_percentile(model):
    result = scan(
        TRAIN,
        SYNTHETIC,
        model=model,
        cache=False,
        reference=SYNTHETIC,
        use_reference_threshold=True,
        decision="score",
        precision="float32",
    )
    # Dar et al.: each training image's best score against the held-out images, 95th percentile
    expected = np.percentile(model.matrix(load_images(TRAIN)[1], load_images(SYNTHETIC)[1]).max(axis=1), 95)
    assert result.thresholds.high == pytest.approx(expected, abs=1e-5)
    assert result.summary.reference["p95_threshold"] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(DeepSSIMError, match="needs reference images"):
        scan(TRAIN, SYNTHETIC, model=model, cache=False, use_reference_threshold=True)


def test_cache_embeds_only_new_images(tmp_path, model, monkeypatch):
    generated = tmp_path / "generated"
    shutil.copytree(SYNTHETIC, generated)
    cache = tmp_path / "cache.sqlite"
    first = scan(TRAIN, generated, model=model, cache=cache)
    embedded = []
    original = type(model).embed

    def counting(self, images, *args, **kwargs):
        embedded.append(len(images))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(type(model), "embed", counting)
    again = scan(TRAIN, generated, model=model, cache=cache)
    assert embedded == []
    np.testing.assert_array_equal(again.scores, first.scores)
    (generated / "gen_copy_0.png").rename(generated / "renamed.png")  # same content: still cached
    Image.fromarray(np.uint8(np.random.default_rng(0).integers(0, 255, (128, 128)))).save(
        generated / "new.png"
    )
    scan(TRAIN, generated, model=model, cache=cache)
    assert embedded == [1]


def test_file_names_are_escaped_in_the_report(tmp_path, model, rng):
    folder = tmp_path / "generated"
    folder.mkdir()
    image = smooth_image(rng, (128, 128))
    scaled = ((image - image.min()) / np.ptp(image) * 255).astype(np.uint8)
    Image.fromarray(scaled).save(folder / "<img src=x onerror='alert(1)'>&.png")
    result = scan(TRAIN, folder, model=model, cache=False)
    html = result.save(tmp_path / "out")["report"].read_text()
    assert "<img src=x" not in html
    assert "&lt;img src=x onerror=&#x27;alert(1)&#x27;&gt;&amp;" in html


def test_scan_and_calibrate_commands(tmp_path, capsys):
    out = tmp_path / "scan"
    args = [
        "scan",
        "--train",
        str(TRAIN),
        "--generated",
        str(SYNTHETIC),
        "--metric",
        "ssim",
        "--out",
        str(out),
    ]
    assert main([*args, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Duplicate" in printed and f"report: {out / 'report.html'}" in printed
    planted = read_csv(EXAMPLE / "planted.csv")
    labels = {"duplicate": 1, "duplicate_misaligned": 1, "similar": 2, "different": 0}  # the file codes
    labelled = tmp_path / "labelled.csv"
    with open(labelled, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["train_key", "generated_key", "label"])
        for row in planted:
            if row["source_train_key"]:
                writer.writerow([row["source_train_key"], row["generated_key"], labels[row["kind"]]])
    thresholds = tmp_path / "thresholds.json"
    calibrate_args = [
        "calibrate",
        "--pairs",
        str(labelled),
        "--train",
        str(TRAIN),
        "--generated",
        str(SYNTHETIC),
    ]
    assert main([*calibrate_args, "--metric", "ssim", "--out", str(thresholds), "--no-progress"]) == 0
    saved = json.loads(thresholds.read_text())
    assert saved["metric"] == "ssim" and saved["low"] <= saved["high"]
    # SSIM's thresholds are for SSIM's score: the scan lets SSIM decide, as calibrate suggests
    assert (
        main([*args, "--decision", "score", "--thresholds", str(thresholds), "--no-progress", "--overwrite"])
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["thresholds"]["high"] == pytest.approx(saved["high"])
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(["scan", "--train", str(TRAIN), "--generated", str(empty), "--out", str(tmp_path / "x")]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None and not os.environ.get("CI"), reason="chromium not installed")
def test_report_renders_in_headless_chromium(tmp_path, model):
    assert _chromium(), "CI must install Debian's chromium (see .ci/run)"
    report = scan(TRAIN, SYNTHETIC, model=model, cache=False).save(tmp_path / "out")["report"]
    common = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    dom = subprocess.run(
        [*common, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    assert 'id="summary-table"' in dom and "Duplicate" in dom
    assert dom.count('<figure class="pair">') == 18
    assert 'id="histogram-image"' in dom
    screenshot = tmp_path / "report.png"
    subprocess.run(
        [*common, "--window-size=1200,1600", f"--screenshot={screenshot}", report.as_uri()],
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=float)
    assert pixels.shape == (1600, 1200)
    assert pixels.std() > 20  # images and text were drawn, not a blank page


def test_two_stage_decision_calls_every_planted_copy_by_registered_ssim(tmp_path, model):
    """DeepSSIM retrieves, registered SSIM decides: misaligned copies become Duplicates on their
    aligned SSIM, and every reported number is the SSIM of the registered pair (scikit-image)."""
    from skimage.metrics import structural_similarity

    from deepssim.ssim.registered import apply_transform

    result = scan(TRAIN, SYNTHETIC, model=model, k=5, cache=False)
    assert result.decision == "two-stage" and "registered SSIM decides" in result.summary.decision
    evidence = result.evidence
    assert np.isfinite(evidence.ssim_registered).all()
    assert (np.diff(evidence.ssim_registered, axis=1) <= 1e-12).all()  # rows ordered by registered SSIM
    assert (evidence.ssim_registered >= evidence.ssim_plain - 1e-9).all()
    planted = {row["generated_key"]: row for row in read_csv(EXAMPLE / "planted.csv")}
    keys, train = load_images(TRAIN)
    _, fake = load_images(SYNTHETIC)
    for i, key in enumerate(result.generated_keys):
        if planted[key]["kind"].startswith("duplicate"):
            assert result.classes[i] == Label.DUPLICATE, key
            assert result.train_keys[result.neighbours[i, 0]] == planted[key]["source_train_key"]
        if planted[key]["kind"] == "different":
            assert result.classes[i] != Label.DUPLICATE, key  # no other subject is called a copy
        aligned = apply_transform(fake[i], **evidence.transform(i, 0))
        a = (train[result.neighbours[i, 0]] - train[result.neighbours[i, 0]].mean()) / train[
            result.neighbours[i, 0]
        ].std()
        b = (aligned - aligned.mean()) / aligned.std()
        expected = structural_similarity(a, b, data_range=a.max() - a.min())
        assert evidence.ssim_registered[i, 0] == pytest.approx(expected, abs=1e-5)
    files = result.save(tmp_path / "out")
    rows = read_csv(files["results"])
    assert {"top1_ssim_registered", "top1_transform", "top1_ssim"} <= set(rows[0])
    assert rows[0]["top1_transform"].startswith("flip=")
    assert "registered SSIM" in files["report"].read_text()


def test_scan_settings_are_validated_once_and_recorded():
    from deepssim.execution.search import SEARCH_BACKENDS
    from deepssim.scanning.settings import ScanSettings
    from deepssim.settings import allowed_values

    assert allowed_values(ScanSettings, "search") == tuple(SEARCH_BACKENDS)  # the choices follow the registry
    with pytest.raises(DeepSSIMError, match="decision must be one of two-stage, score"):
        ScanSettings(decision="vote")
    with pytest.raises(DeepSSIMError, match="--top-k must be at least 1"):
        ScanSettings(k=0)
    with pytest.raises(DeepSSIMError, match="needs --group-by"):
        ScanSettings(duplicate_fpr=0.1)
    with pytest.raises(DeepSSIMError, match="choose one of"):
        scan(TRAIN, SYNTHETIC, metric="ssim", search="annoy")


def test_the_scan_registers_on_its_device(model, monkeypatch):
    """The scan's device reaches registration: the search and the candidates' SSIM run where the
    embedding does (here "cpu:0", which the CPU default would not produce)."""
    from deepssim.scanning import registration

    seen = []
    original = registration.register_cascade

    def spy(training, *args, settings, **kwargs):
        seen.append((str(training.device), settings.device))
        return original(training, *args, settings=settings, **kwargs)

    monkeypatch.setattr(registration, "register_cascade", spy)
    result = scan(TRAIN, SYNTHETIC, model=model, k=2, cache=False, device="cpu:0")
    assert seen and set(seen) == {("cpu:0", "cpu:0")}
    assert (result.classes == scan(TRAIN, SYNTHETIC, model=model, k=2, cache=False).classes).all()
