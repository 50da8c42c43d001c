"""The labelling page: a local HTTP server on 127.0.0.1 for one rater.

It serves one self-contained page (no external scripts or fonts), the images of the queued pairs
by queue position only (no file paths, so no path tricks), and a small JSON API whose every
click is one SQLite transaction (:mod:`deepssim.labelling.store`). Requests must name this
server as their Host (DNS rebinding) and POSTs carry a custom header (other sites cannot send
it without a CORS preflight that this server never grants).
"""

from __future__ import annotations

import contextlib
import json
import re
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
IMAGE_PATH = re.compile(r"/image/(\d+)/(train|generated|difference)\.png")
CLIENT_HEADER = "X-DeepSSIM"
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

    def state(self) -> dict:
        following, done, total = self.store.progress(self.rater)
        pair = None
        if following is not None:
            queued = self.queue[following]
            pair = {
                "position": following,
                "train_key": queued.train_key,
                "generated_key": queued.generated_key,
            }
        return {"rater": self.rater, "done": done, "total": total, "pair": pair}

    def label(self, position: int, label: str) -> dict:
        if not 0 <= position < len(self.queue):
            raise DeepSSIMError(f"no pair at position {position}")
        self.store.record(self.rater, position, label)
        return self.state()

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

        def do_GET(self):  # noqa: N802 - http.server's name
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

        def do_POST(self):  # noqa: N802 - http.server's name
            if not self._allowed_host() or self.headers.get(CLIENT_HEADER) != "1":
                return self._json({"error": "forbidden"}, HTTPStatus.FORBIDDEN)
            try:
                length = min(int(self.headers.get("Content-Length", 0)), 10_000)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/api/label":
                    label = body.get("label")
                    if label not in (*LABELS, SKIP):
                        raise DeepSSIMError(f"unknown label {label!r}")
                    return self._json(session.label(int(body["position"]), label))
                if self.path == "/api/undo":
                    return self._json(session.undo())
            except (DeepSSIMError, ValueError, KeyError, TypeError) as error:
                return self._json({"error": str(error)}, HTTPStatus.BAD_REQUEST)
            return self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)

    try:
        return ThreadingHTTPServer((HOST, port), Handler)
    except OSError as error:
        raise DeepSSIMError(
            f"cannot listen on {HOST}:{port} ({error.strerror}); choose another --port"
        ) from None
