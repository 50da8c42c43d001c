"""The labelling server answers every malformed request with a JSON 400 (never a traceback or an
empty reply), takes labels only for queued positions the rater has been shown, and never echoes
the input back. Raw HTTP with http.client against a server started in-process on 127.0.0.1; the
scan folder is written by hand (no model run)."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading

import pytest

from deepssim.labelling import LabelStore
from deepssim.labelling.server import MAX_BODY, LabellingSession, make_server
from tests.helpers import EXAMPLE

PAIRS = 4
HEADERS = {"X-DeepSSIM": "1", "Content-Type": "application/json"}


@pytest.fixture
def scan_folder(tmp_path):
    """A scan output folder as :class:`ScanPairs` reads it: summary.json, pairs.csv, the images."""
    train, generated, scan = tmp_path / "train", tmp_path / "generated", tmp_path / "scan"
    for folder in (train, generated, scan):
        folder.mkdir()
    train_keys = [p.stem for p in sorted((EXAMPLE / "train").glob("*.png"))[:PAIRS]]
    generated_keys = [p.stem for p in sorted((EXAMPLE / "generated").glob("*.png"))[:PAIRS]]
    for key in train_keys:
        shutil.copy(EXAMPLE / "train" / f"{key}.png", train)
    for key in generated_keys:
        shutil.copy(EXAMPLE / "generated" / f"{key}.png", generated)
    lines = ["generated_key,rank,train_key,score,class"]
    pairs = enumerate(zip(train_keys, generated_keys, strict=True))
    lines += [f"{g},1,{t},{0.2 * n + 0.1:.6f},Different" for n, (t, g) in pairs]
    (scan / "pairs.csv").write_text("\n".join(lines) + "\n")
    audit = {
        "settings": {"decision": "single-stage", "thresholds": {"low": 0.4, "high": 0.8}, "loading": {}},
        "inputs": {"training": {"given": [str(train)]}, "generated": {"given": [str(generated)]}},
    }
    (scan / "summary.json").write_text(json.dumps({"audit": audit}))
    return scan


@pytest.fixture
def served(tmp_path, scan_folder):
    session = LabellingSession(scan_folder, tmp_path / "labels", rater="ann", pairs=PAIRS)
    server = make_server(session, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield session, server
    server.shutdown()
    server.server_close()


def _request(server, method, path, body=None, headers=HEADERS):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


def _post(server, path, body, headers=HEADERS):
    status, content_type, raw = _request(server, "POST", path, body, headers)
    assert content_type == "application/json", (status, raw)
    return status, json.loads(raw)


def _label(server, position, label="Duplicate"):
    return _post(server, "/api/label", json.dumps({"position": position, "label": label}))


def test_malformed_bodies_get_a_json_400(served, capfd):
    _, server = served
    bodies = [
        b"[]",
        b"null",
        b"42",
        b'"position"',
        b"not json",
        b"{",
        b"\xff\xfe\x00",  # not UTF-8
        b"[" * 5000 + b"]" * 5000,  # deeper than the JSON parser recurses
        b"{}",
        b'{"position": 0}',
        b'{"label": "Duplicate"}',
        b'{"position": "0", "label": "Duplicate"}',
        b'{"position": [0], "label": "Duplicate"}',
        b'{"position": {}, "label": "Duplicate"}',
        b'{"position": null, "label": "Duplicate"}',
        b'{"position": 0, "label": ["Duplicate"]}',
        b'{"position": 0, "label": {"a": 1}}',
        b'{"position": 0, "label": null}',
        b'{"position": 0, "label": "duplicate"}',
        b'{"position": 0, "label": 3}',
        b'{"position": NaN, "label": "Duplicate"}',
        b'{"position": Infinity, "label": "Duplicate"}',
        b'{"position": 1' + b"0" * 5000 + b', "label": "Duplicate"}',  # over Python's digit limit
    ]
    for body in bodies:
        status, answer = _post(server, "/api/label", body)
        assert status == 400, body[:60]
        assert isinstance(answer["error"], str) and answer["error"], body[:60]
    assert _post(server, "/api/undo", b"[]")[0] == 400
    assert _post(server, "/api/undo", b"{")[0] == 400
    assert "Traceback" not in capfd.readouterr().err


def test_bad_content_lengths_get_a_json_400(served, capfd):
    _, server = served
    for length in ("-5", "abc", "1e3", "", "99999999999999999999"):
        status, answer = _post(server, "/api/label", None, {**HEADERS, "Content-Length": length})
        assert status == 400 and answer["error"], length
    status, answer = _post(server, "/api/label", b"{" + b" " * (MAX_BODY + 10) + b"}")
    assert status == 400 and str(MAX_BODY) in answer["error"]
    # a body shorter than its Content-Length, then the client stops: a 400, not a hung thread
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as raw:
        raw.sendall(
            f"POST /api/label HTTP/1.0\r\nHost: 127.0.0.1:{server.server_address[1]}\r\nX-DeepSSIM: 1\r\n"
            "Content-Length: 50\r\n\r\n{}".encode()
        )
        raw.shutdown(socket.SHUT_WR)
        reply = raw.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.0 400") and b"application/json" in reply
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize(
    "position",
    [True, False, 0.0, 1.5, 1e308, -1e308, -1, PAIRS, PAIRS + 1, 10**30, 2**63, -(2**63)],
    ids=repr,
)
def test_positions_must_be_queued_integers_and_are_never_echoed(served, position):
    session, server = served
    status, answer = _label(server, position)
    assert status == 400
    assert f"0 to {PAIRS - 1}" in answer["error"]
    if position not in (0, 1, -1, PAIRS, PAIRS + 1):
        assert str(position) not in answer["error"] and repr(position) not in answer["error"]
    assert "e+" not in answer["error"] and "308" not in answer["error"]
    assert session.store.events() == []


def test_a_label_is_taken_only_for_a_pair_the_rater_was_shown(served, scan_folder):
    session, server = served
    # no state asked yet: nothing has been shown, not even the first pair
    status, answer = _label(server, 0)
    assert status == 400 and "not been shown" in answer["error"]
    status, _, raw = _request(server, "GET", "/api/state")
    assert status == 200 and json.loads(raw)["pair"]["position"] == 0
    status, answer = _label(server, 2)  # a queued pair further on, not shown yet
    assert status == 400 and "not been shown" in answer["error"]
    status, state = _label(server, 0)
    assert status == 200 and state["pair"]["position"] == 1 and state["done"] == 1
    status, state = _label(server, 1, "skip")
    assert status == 200 and state["pair"]["position"] == 2
    assert _label(server, 0, "Different")[0] == 200  # relabelling an earlier pair
    assert _label(server, 3)[0] == 400
    assert [(e[2], e[3]) for e in session.store.events()] == [(0, "Duplicate"), (1, "skip"), (0, "Different")]
    status, state = _post(server, "/api/undo", b"")
    assert status == 200 and state["pair"]["position"] == 2

    # a new session on the same folder (the server restarted) knows what ann labelled before
    again = LabellingSession(scan_folder, session.store.folder, rater="ann", pairs=PAIRS)
    assert again.shown(0) and again.shown(1) and not again.shown(2)
    bob = LabellingSession(scan_folder, session.store.folder, rater="bob", pairs=PAIRS)
    assert not bob.shown(0)
    with pytest.raises(ValueError, match="not been shown"):
        bob.label(0, "Duplicate")
    assert LabelStore.open(session.store.folder).current() == {("ann", 0): "Duplicate", ("ann", 1): "skip"}


def test_other_requests_still_answer_json(served):
    _, server = served
    assert _post(server, "/api/nothing", b"{}")[0] == 404
    assert _post(server, "/api/label", b"{}", {"Content-Type": "application/json"})[0] == 403
    status, content_type, _ = _request(server, "GET", "/image/" + "9" * 5000 + "/train.png")
    assert status == 404 and content_type == "application/json"
