"""deepssim label: the queue, the SQLite store, Fleiss' kappa (against statsmodels) and the page,
driven in headless Chromium with clicks and key presses."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from playwright import sync_api as playwright
from playwright.sync_api import expect
from statsmodels.stats import inter_rater

from deepssim import scan
from deepssim.labelling import LabelStore, choose_pairs, fleiss_kappa, summarise
from deepssim.labelling.agreement import agreement
from deepssim.labelling.queue import QueuedPair
from deepssim.labelling.server import LabellingSession, make_server
from deepssim.labels import Label
from tests.helpers import EXAMPLE

HOSTILE_KEY = "<img src=x onerror=document.title='pwned'>"


def test_fleiss_kappa_matches_statsmodels():
    rng = np.random.default_rng(0)
    for raters in (2, 3, 5):
        truth = rng.integers(0, 3, 60)
        ratings = np.where(rng.random((60, raters)) < 0.7, truth[:, None], rng.integers(0, 3, (60, raters)))
        table, _ = inter_rater.aggregate_raters(ratings, n_cat=3)
        expected = inter_rater.fleiss_kappa(table, method="fleiss")
        assert fleiss_kappa(table) == pytest.approx(expected, abs=1e-12)


def test_the_draw_is_seeded_stratified_and_leans_on_the_thresholds():
    scores = np.random.default_rng(1).beta(5, 2, 4000)  # most pairs at high scores
    first = choose_pairs(scores, 400, 0.6, 0.85, seed=3)
    assert np.array_equal(first, choose_pairs(scores, 400, 0.6, 0.85, seed=3))
    assert len(set(first.tolist())) == 400
    drawn = scores[first]
    # stratified: the sparse low-score range is drawn far above its share of the pairs
    assert np.mean(drawn < 0.4) > 2 * np.mean(scores < 0.4)
    # with evenly spread scores, pairs at a threshold are drawn about 3x as often as pairs far from both
    even = np.random.default_rng(2).random(4000)
    drawn = choose_pairs(even, 400, 0.6, 0.85, seed=3)
    rate = lambda mask: np.isin(np.flatnonzero(mask), drawn).mean()  # noqa: E731
    assert rate(np.abs(even - 0.85) < 0.01) > 2 * rate(np.abs(even - 0.3) < 0.03)
    assert rate(np.abs(even - 0.6) < 0.01) > 2 * rate(np.abs(even - 0.3) < 0.03)


def test_store_keeps_every_click_and_undo_goes_back(tmp_path):
    pairs = [QueuedPair(f"t{i}", f"g{i}", i / 10, "") for i in range(4)]
    store = LabelStore.create(tmp_path, pairs, {"scan": "one"})
    other = LabelStore.open(tmp_path)  # a second writer on the same folder
    store.record("ann", 0, "Duplicate")
    other.record("bob", 0, "Similar")
    store.record("ann", 1, "skip")
    assert store.progress("ann") == (2, 2, 4)
    assert store.undo("ann") == 1
    assert store.progress("ann") == (1, 1, 4)
    store.record("ann", 0, "Different")  # relabelling: the latest wins
    assert other.current() == {("ann", 0): "Different", ("bob", 0): "Similar"}
    assert len(store.events()) == 4  # nothing is deleted: the undone event stays, marked
    with pytest.raises(ValueError, match="holds labels of the scan"):
        LabelStore.create(tmp_path, pairs, {"scan": "another"})


@pytest.fixture
def scan_folder(tmp_path):
    """A small scan of the bundled example, one generated file with a hostile name."""
    train, generated = tmp_path / "train", tmp_path / "generated"
    train.mkdir()
    generated.mkdir()
    for path in sorted((EXAMPLE / "train").glob("*.png"))[:8]:
        shutil.copy(path, train)
    for path in sorted((EXAMPLE / "generated").glob("*.png"))[:5]:
        shutil.copy(path, generated)
    shutil.copy(EXAMPLE / "generated" / "gen_copy_0.png", generated / f"{HOSTILE_KEY}.png")
    result = scan(train, generated, k=3, cache=False)
    result.save(tmp_path / "scan", report=False)
    return tmp_path / "scan"


def _serve(session):
    server = make_server(session, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def _request(server, method, path, body=None, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, response.read()


def test_server_refuses_paths_hosts_and_foreign_posts(tmp_path, scan_folder):
    session = LabellingSession(scan_folder, tmp_path / "labels", rater="ann", pairs=6)
    server, _ = _serve(session)
    try:
        assert server.server_address[0] == "127.0.0.1"
        tricks = ("/image/../../etc/passwd", "/image/0/../../x.png", "/image/999/train.png", "/etc/passwd")
        for path in tricks:
            assert _request(server, "GET", path)[0] == 404
        assert _request(server, "GET", "/image/0/train.png")[0] == 200
        assert _request(server, "GET", "/", headers={"Host": "evil.example:80"})[0] == 403
        label = json.dumps({"position": 0, "label": "Duplicate"})
        assert _request(server, "POST", "/api/label", label)[0] == 403  # no client header
        status, body = _request(server, "GET", "/api/state")
        assert status == 200 and "score" not in json.loads(body)["pair"]  # never the model's score
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(
    shutil.which("chromium") is None and not os.environ.get("CI"), reason="chromium not installed"
)
def test_two_raters_label_in_chromium_resume_and_agree(tmp_path, scan_folder):
    labels = tmp_path / "labels"
    ann = LabellingSession(scan_folder, labels, rater="ann", pairs=6)
    server, url = _serve(ann)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url)
        expect(page.locator("#progress")).to_contain_text("1 of 6")
        assert "0." not in page.inner_text("body")  # no score on the page
        page.click("#Duplicate")
        expect(page.locator("#progress")).to_contain_text("2 of 6")
        steps = (("1", "3 of 6"), ("2", "4 of 6"), ("u", "3 of 6"), ("3", "4 of 6"), ("s", "5 of 6"))
        for key, expected in steps:
            page.keyboard.press(key)
            expect(page.locator("#progress")).to_contain_text(expected)
        keys = page.inner_text("#generated-key")
        page.screenshot(path=str(tmp_path / "labelling.png"))
        page.close()  # the rater closes the tab ...
        page = browser.new_page()  # ... and comes back: nothing lost, same place
        page.goto(url)
        expect(page.locator("#progress")).to_contain_text("5 of 6")
        assert page.inner_text("#generated-key") == keys
        page.keyboard.press("3")
        expect(page.locator("#progress")).to_contain_text("6 of 6")
        page.keyboard.press("3")
        expect(page.locator("#done")).to_be_visible()
        hostile = [q for q in ann.queue if q.generated_key == HOSTILE_KEY]
        assert page.title() != "pwned"
        server.shutdown()
        server.server_close()

        bob = LabellingSession(scan_folder, labels, rater="bob", pairs=6)
        assert [q.generated_key for q in bob.queue] == [q.generated_key for q in ann.queue]  # one order
        server, url = _serve(bob)
        page = browser.new_page()
        page.goto(url)
        expect(page.locator("#rater")).to_have_text("bob")
        for n, key in enumerate("332113", start=1):
            expect(page.locator("#progress")).to_contain_text(f"{n} of 6")
            if hostile and ann.queue.index(hostile[0]) == n - 1:
                assert page.inner_text("#generated-key") == HOSTILE_KEY  # shown as text, not markup
            page.keyboard.press(key)
        expect(page.locator("#done")).to_be_visible()
        assert page.title() != "pwned"
        browser.close()
    server.shutdown()
    server.server_close()

    current = LabelStore.open(labels).current()
    expected_ann = ["Duplicate", "Different", "Duplicate", "skip", "Duplicate", "Duplicate"]
    assert [current[("ann", i)] for i in range(6)] == expected_ann
    expected_bob = ["Duplicate", "Duplicate", "Similar", "Different", "Different", "Duplicate"]
    assert [current[("bob", i)] for i in range(6)] == expected_bob

    report = summarise(labels, bootstrap=200)
    both = [i for i in range(6) if expected_ann[i] != "skip"]
    codes = np.array([[Label.parse(expected_ann[i]), Label.parse(expected_bob[i])] for i in both])
    table, _ = inter_rater.aggregate_raters(codes, n_cat=3)
    assert report.pairs_labelled_by_all == 5 and report.skips == 1
    assert report.kappa == pytest.approx(inter_rater.fleiss_kappa(table, method="fleiss"), abs=1e-12)
    assert report.kappa_interval[0] <= report.kappa <= report.kappa_interval[1]
    assert report.confusion["Duplicate"]["Similar"] == report.confusion["Similar"]["Duplicate"] == 1
    assert report.confusion["Duplicate"]["Different"] == 2 and report.confusion["Duplicate"]["Duplicate"] == 2
    # pairs 1, 2 and 4 tie (one vote each way); pair 3 has bob's vote only (ann skipped it)
    assert report.ties == 3
    rows = agreement(LabelStore.open(labels))[1]
    assert [(r["label"], r["votes"], r["raters"]) for r in rows] == [
        ("Duplicate", 2, 2),
        ("Different", 1, 1),
        ("Duplicate", 2, 2),
    ]
    assert (labels / "labelled.csv").read_text().splitlines()[0] == (
        "train_key,generated_key,label,votes,raters"
    )

    calibrated = subprocess.run(
        [sys.executable, "-m", "deepssim.cli", "calibrate", "--labels", str(labels), "--metric", "ssim"]
        + ["--out", str(tmp_path / "thresholds.json"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert calibrated.returncode == 0, calibrated.stderr
    assert json.loads((tmp_path / "thresholds.json").read_text())["pairs"] == 3
