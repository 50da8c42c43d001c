"""The labelling page: a local HTTP server on 127.0.0.1 for one rater.

It serves one self-contained page (no external scripts or fonts), the images of the queued pairs
by queue position only (no file paths, so no path tricks), and a small JSON API whose every
click is one SQLite transaction (:mod:`deepssim.labelling.store`). Requests must name this
server as their Host (DNS rebinding) and POSTs carry a custom header (other sites cannot send
it without a CORS preflight that this server never grants).

Every request gets a JSON answer: a malformed body (not JSON, not an object, wrong types,
missing fields, too long) is a 400 that names what is wrong without echoing the input back. A
label is taken only for a position of the queue that this rater has been shown (the pair
``/api/state`` answered with, or one they labelled before), so a stray or forged request
cannot label pairs nobody looked at.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import threading
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.io.display import colour, png_bytes, to_uint8
from deepssim.labelling.queue import PairImages, ScanPairs, choose_pairs
from deepssim.labelling.store import LABELS, SKIP, LabelStore

HOST = "127.0.0.1"
IMAGE_PATH = re.compile(r"/image/([0-9]{1,9})/(train|generated|difference)\.png")
CLIENT_HEADER = "X-DeepSSIM"
MAX_BODY = 10_000  # bytes: a click is a few dozen
DRAIN_LIMIT = 1 << 20  # an over-long body is read away up to this, so the 400 reaches the client
DIFFERENCE_RANGE = (0.0, 2.0)  # |z-score difference|: one fixed scale, so a copy looks dark


class LabellingSession:
    """One rater's view of a labels folder: the queue, its images and the store."""

    def __init__(
        self,
        scan: str | Path,
        labels: str | Path,
        *,
        rater: str,
        pairs: int = 200,
        seed: int = 0,
        train: list[str] | None = None,
        generated: list[str] | None = None,
    ):
        if not rater.strip():
            raise DeepSSIMError("--rater must name the rater")
        scan_pairs = ScanPairs.read(scan)
        order = choose_pairs(
            np.array([p.score for p in scan_pairs.pairs]), pairs, scan_pairs.low, scan_pairs.high, seed=seed
        )
        meta = {
            "scan": str(scan_pairs.folder),
            "seed": seed,
            "pairs_requested": pairs,
            "thresholds": [scan_pairs.low, scan_pairs.high],
            "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.store = LabelStore.create(labels, [scan_pairs.pairs[i] for i in order], meta)
        self.queue = self.store.queue()
        inputs = dict(scan_pairs.inputs)
        if train:
            inputs["training"] = train
        if generated:
            inputs["generated"] = generated
        self.images = PairImages(inputs, scan_pairs.options)
        self.images.check(self.queue)
        self.rater = rater.strip()
        self._pngs: dict[tuple[int, str], bytes] = {}
        self._lock = threading.Lock()
        self._shown: set[int] = set()  # positions whose pair this session has put on the page

    def state(self) -> dict:
        following, done, total = self.store.progress(self.rater)
        pair = None
        if following is not None:
            with self._lock:
                self._shown.add(following)
            queued = self.queue[following]
            pair = {
                "position": following,
                "train_key": queued.train_key,
                "generated_key": queued.generated_key,
            }
        return {"rater": self.rater, "done": done, "total": total, "pair": pair}

    def label(self, position: int, label: str) -> dict:
        """Record the rater's label of the pair at ``position``; the new state.

        ``position`` must be an int (not a bool) of the queue that the rater has been shown;
        the errors never repeat the value given.
        """
        if type(position) is not int or not 0 <= position < len(self.queue):
            raise DeepSSIMError(f"position must be an integer from 0 to {len(self.queue) - 1}")
        if label not in (*LABELS, SKIP):
            raise DeepSSIMError(f"label must be one of {', '.join(LABELS)} or {SKIP}")
        if not self.shown(position):
            raise DeepSSIMError(f"the pair at position {position} has not been shown to {self.rater} yet")
        self.store.record(self.rater, position, label)
        return self.state()

    def shown(self, position: int) -> bool:
        """Whether the rater has seen this pair: shown by this session or labelled before (any run)."""
        with self._lock:
            if position in self._shown:
                return True
        seen = any(rater == self.rater and at == position for _, rater, at, *_ in self.store.events())
        if seen:
            with self._lock:
                self._shown.add(position)
        return seen

    def undo(self) -> dict:
        self.store.undo(self.rater)
        return self.state()

    def png(self, position: int, kind: str) -> bytes | None:
        if not 0 <= position < len(self.queue):
            return None
        with self._lock:
            if (position, kind) not in self._pngs:
                self._pngs[(position, kind)] = self._render(position, kind)
            return self._pngs[(position, kind)]

    def _render(self, position: int, kind: str) -> bytes:
        from deepssim.ssim.registered import apply_transform, parse_transform

        pair = self.queue[position]
        train = self.images.image("training", pair.train_key)
        generated = self.images.image("generated", pair.generated_key)
        if kind == "train":
            return png_bytes(to_uint8(train))
        if kind == "generated":
            return png_bytes(to_uint8(generated))
        if pair.transform:  # the difference after the scan's registration: what is left to see
            generated = apply_transform(generated, **parse_transform(pair.transform))
        za = (train - train.mean()) / max(train.std(), 1e-12)
        zb = (generated - generated.mean()) / max(generated.std(), 1e-12)
        return png_bytes(colour(np.abs(za - zb), "magma", DIFFERENCE_RANGE))


def make_server(session: LabellingSession, port: int = 8765) -> ThreadingHTTPServer:
    """A server bound to 127.0.0.1 only (``port`` 0 picks a free one); call ``serve_forever``."""
    page = resources.files("deepssim.labelling").joinpath("page.html").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        server_version = "deepssim-label"
        timeout = 30  # seconds a client may stall mid-request before its socket is closed

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass  # clicks are in the store; no per-request noise on the terminal

        def _allowed_host(self) -> bool:
            port = self.server.server_address[1]
            return self.headers.get("Host") in (f"{HOST}:{port}", f"localhost:{port}")

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header(
                "Content-Security-Policy",
                "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
                "script-src 'unsafe-inline'; connect-src 'self'",
            )
            self.end_headers()
            # a tab that went away mid-answer asks again on its next request
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)

        def _json(self, value: dict, status: HTTPStatus = HTTPStatus.OK) -> None:
            self._send(status, json.dumps(value).encode(), "application/json")

        def _guarded(self, method) -> None:
            try:
                method()
            except Exception as error:  # a bug: one line on the terminal, a JSON 500 to the page
                print(f"deepssim label: {type(error).__name__} answering {self.command}", file=sys.stderr)
                self._json({"error": "internal error; see the terminal"}, HTTPStatus.INTERNAL_SERVER_ERROR)

        def do_GET(self):  # noqa: N802 - http.server's name
            self._guarded(self._get)

        def do_POST(self):  # noqa: N802 - http.server's name
            self._guarded(self._post)

        def _get(self) -> None:
            if not self._allowed_host():
                return self._json({"error": "unknown host"}, HTTPStatus.FORBIDDEN)
            path = self.path.split("?", 1)[0]
            if path == "/":
                return self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            if path == "/api/state":
                return self._json(session.state())
            match = IMAGE_PATH.fullmatch(path)
            png = session.png(int(match[1]), match[2]) if match else None
            if png is None:
                return self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)
            return self._send(HTTPStatus.OK, png, "image/png")

        def _post(self) -> None:
            if not self._allowed_host() or self.headers.get(CLIENT_HEADER) != "1":
                return self._json({"error": "forbidden"}, HTTPStatus.FORBIDDEN)
            if self.path not in ("/api/label", "/api/undo"):
                return self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)
            try:
                body = self._read_body()
                if self.path == "/api/undo":
                    return self._json(session.undo())
                if "position" not in body or "label" not in body:
                    raise DeepSSIMError("the body must be a JSON object with 'position' and 'label'")
                return self._json(session.label(body["position"], body["label"]))
            except DeepSSIMError as error:
                return self._json({"error": str(error)}, HTTPStatus.BAD_REQUEST)

        def _read_body(self) -> dict:
            """The request's JSON object ({} without a body); DeepSSIMError for anything else."""
            text = (self.headers.get("Content-Length") or "0").strip()
            if not re.fullmatch(r"[0-9]{1,12}", text):
                raise DeepSSIMError("Content-Length must be a non-negative integer")
            length = int(text)
            if length > MAX_BODY:
                with contextlib.suppress(OSError):  # read it away, so the answer is not lost to a reset
                    self.rfile.read(min(length, DRAIN_LIMIT))
                self.close_connection = True
                raise DeepSSIMError(f"the body is longer than {MAX_BODY} bytes")
            try:
                raw = self.rfile.read(length) if length else b""
            except OSError:  # the client stopped sending (the socket's timeout)
                self.close_connection = True
                raise DeepSSIMError("the body ended before its Content-Length") from None
            if len(raw) < length:
                raise DeepSSIMError("the body ended before its Content-Length")
            if not raw.strip():
                return {}
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep, huge numbers
                raise DeepSSIMError("the body is not valid JSON") from None
            if not isinstance(body, dict):
                raise DeepSSIMError("the body must be a JSON object")
            return body

    try:
        return ThreadingHTTPServer((HOST, port), Handler)
    except OSError as error:
        raise DeepSSIMError(
            f"cannot listen on {HOST}:{port} ({error.strerror}); choose another --port"
        ) from None
