"""The scan on a Ray cluster: ``deepssim scan --engine ray [--ray-address ADDRESS]``.

- **Embedding.** Ray Data reads and embeds images in shards of ``shard_size`` images, with a pool
  of actors that each hold the model. Each shard is written as one Parquet file (key, signature,
  content hash, vector) by the actor that embedded it, atomically (temporary file, then rename).
  A rerun reads the shards already written and embeds only images whose signature (key, file
  size and modification time, loading options) has no vector yet, so an interrupted job loses at
  most the shards in flight, and a job with more images embeds only the new ones.
- **Search.** Top-k as a map-reduce: each task holds one shard of training embeddings, streams
  the generated embeddings through it in blocks (torch or FAISS, as locally) and returns its top-k
  per generated image and the best score of each of its training images; the driver merges.
- **Exact SSIM work** (registration of top-k pairs, SSIM matrices, SSIM top-k) runs as one Ray
  task per block.

Workers need deepssim installed (the same version) and read the images from the paths the
driver indexed, so the images must be on a file system every node sees.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.execution.engines import ENGINES, LocalEngine, ScanEngine, block_progress, merge_top_k
from deepssim.extras import require
from deepssim.io.load import ImageSet
from deepssim.settings import whole_number

SEARCH_SHARD_ROWS = 262_144  # training embeddings per search task, at most


@ENGINES.register("ray")
class RayEngine(ScanEngine):
    """address: a running cluster ("auto", "ray://host:10001", ...) or None for a local Ray
    instance on this machine (started unless one is running). workers: actors that embed, and
    tasks in flight for the other stages. shard_dir: where the Parquet shards go (None: a
    temporary folder, so nothing resumes)."""

    def __init__(
        self,
        address: str | None = None,
        workers: int = 2,
        cpus_per_worker: float = 1,
        gpus_per_worker: float = 0,
        shard_dir: str | Path | None = None,
        shard_size: int = 1024,
    ):
        if workers < 1 or shard_size < 1:
            raise DeepSSIMError(
                f"--workers and --shard-size must be at least 1, not {workers} and {shard_size}"
            )
        if cpus_per_worker <= 0 or gpus_per_worker < 0:
            raise DeepSSIMError(
                f"--cpus-per-worker must be positive and --gpus-per-worker 0 or more, not "
                f"{cpus_per_worker} and {gpus_per_worker}"
            )
        self.address = address
        self.workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.shard_dir = Path(shard_dir) if shard_dir is not None else None
        self.shard_size = shard_size

    @classmethod
    def add_options(cls, group) -> None:
        group.add_argument(
            "--ray-address",
            help="ray: a running cluster (e.g. auto, ray://HEAD:10001); default: start one here",
        )
        group.add_argument(
            "--workers", type=whole_number(1), default=2, help="ray: actors / tasks in flight (default 2)"
        )
        group.add_argument("--cpus-per-worker", type=float, default=1.0, help="ray: CPUs per worker")
        group.add_argument("--gpus-per-worker", type=float, default=0.0, help="ray: GPUs per worker")
        group.add_argument(
            "--shard-size",
            type=whole_number(1),
            default=1024,
            help="ray: images per Parquet embedding shard (default 1024)",
        )

    @classmethod
    def from_options(cls, options: dict, shard_dir: Path | None = None) -> RayEngine:
        return cls(
            address=options["ray_address"],
            workers=options["workers"],
            cpus_per_worker=options["cpus_per_worker"],
            gpus_per_worker=options["gpus_per_worker"],
            shard_dir=shard_dir,
            shard_size=options["shard_size"],
        )

    def describe(self) -> dict:
        return {
            "engine": "ray",
            "address": self.address or "(local)",
            "workers": self.workers,
            "cpus_per_worker": self.cpus_per_worker,
            "gpus_per_worker": self.gpus_per_worker,
            "shard_size": self.shard_size,
            "shard_dir": str(self.shard_dir) if self.shard_dir else None,
        }

    def ray(self):
        ray = require("ray")
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, include_dashboard=False, logging_level="WARNING")
            except (ConnectionError, ValueError, RuntimeError) as error:
                where = self.address or "a local instance"
                raise DeepSSIMError(f"cannot start or reach Ray at {where}: {error}") from None
        return ray

    # -- embedding ------------------------------------------------------------------------------

    def embedder(self, metric, *, cache=None, batch_size=64, precision="float32", progress=False):
        folder = self.shard_dir or Path(tempfile.mkdtemp(prefix="deepssim-shards-"))
        folder = folder / f"{hashlib.sha256(f'{metric.fingerprint}:{precision}'.encode()).hexdigest()[:16]}"
        return _ShardedEmbedder(self, metric, folder, batch_size, precision, progress)

    # -- search ---------------------------------------------------------------------------------

    def top_k(self, queries, database, k, method="exact"):
        ray = self.ray()
        queries = ray.put(np.ascontiguousarray(queries, dtype=np.float32))
        # one search task = the local engine's search on one shard of training embeddings
        task = ray.remote(num_cpus=self.cpus_per_worker)(_local_top_k)
        ranges = self.split(len(database), max_rows=SEARCH_SHARD_ROWS)
        parts = ray.get(
            [
                task.remote(queries, np.ascontiguousarray(database[start:stop], dtype=np.float32), k, method)
                for start, stop in ranges
            ]
        )
        scores, indices = merge_top_k(
            [(start, s, i) for (start, _), (s, i, _) in zip(ranges, parts, strict=True)],
            min(k, len(database)),
        )
        return scores, indices, np.concatenate([best for _, _, best in parts])

    def split(self, n: int, max_rows: int | None = None) -> list[tuple[int, int]]:
        """Row ranges for tasks: a few per worker (load balance), none above ``max_rows``."""
        count = max(1, min(n, 2 * self.workers))
        if max_rows is not None:
            count = max(count, math.ceil(n / max_rows))
        edges = np.linspace(0, n, count + 1).round().astype(int)
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]

    # -- blocks of work -------------------------------------------------------------------------

    def map(self, function, blocks, *, sizes=None, description="", progress=False):
        ray = self.ray()
        task = ray.remote(num_cpus=self.cpus_per_worker)(function)
        shared: dict[int, object] = {}  # an image set shared by many blocks goes to the store once

        def put(argument):
            if isinstance(argument, ImageSet):
                if id(argument) not in shared:
                    shared[id(argument)] = ray.put(argument)
                return shared[id(argument)]
            return argument

        bar = block_progress(sizes, blocks, description, progress)
        results: list = [None] * len(blocks)
        pending: dict = {}
        queue = list(enumerate(blocks))
        while queue or pending:
            while queue and len(pending) < 2 * self.workers:
                n, block = queue.pop(0)
                pending[task.remote(*map(put, block))] = n
            done, _ = ray.wait(list(pending), num_returns=1)
            for reference in done:
                n = pending.pop(reference)
                results[n] = ray.get(reference)
                bar.update(sizes[n] if sizes is not None else 1)
        bar.close()
        return results


def _local_top_k(queries: np.ndarray, shard: np.ndarray, k: int, method: str):
    return LocalEngine().top_k(queries, shard, k, method)


def _signatures(images: ImageSet) -> list[str]:
    """Cheap identities (no file read): key, file, index, size, modification time, options."""
    options = json.dumps(asdict(images.options), sort_keys=True, default=str)
    stats: dict[Path, os.stat_result] = {}
    out = []
    for ref in images.refs:
        stat = stats.setdefault(ref.path, ref.path.stat())
        text = f"{ref.key}\0{ref.path.resolve()}\0{ref.index}\0{stat.st_size}\0{stat.st_mtime_ns}\0{options}"
        out.append(hashlib.sha256(text.encode()).hexdigest())
    return out


def _read_shards(folder: Path) -> dict[str, np.ndarray]:
    """signature -> vector of every complete shard in ``folder``."""
    pq = require("pyarrow.parquet")
    found = {}
    for path in sorted(folder.glob("*.parquet")):
        try:
            table = pq.read_table(path, columns=["signature", "vector"])
        except Exception as error:  # noqa: BLE001 - an unreadable shard is an error the user must see
            raise DeepSSIMError(
                f"{path}: unreadable embedding shard ({error}); delete it to recompute"
            ) from None
        vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
        found.update(zip(table.column("signature").to_pylist(), vectors, strict=True))
    return found


class _ShardedEmbedder:
    """``embed(images, role)`` on Ray Data, resuming from the Parquet shards in ``folder``."""

    def __init__(self, engine: RayEngine, metric, folder: Path, batch_size, precision, progress):
        self.engine, self.metric, self.folder = engine, metric, folder
        self.batch_size, self.precision, self.progress = batch_size, precision, progress
        self.done: dict[int, np.ndarray] = {}

    def __call__(self, images: ImageSet, role: str) -> np.ndarray:
        if id(images) not in self.done:
            self.prepare({role: images})
        return self.done[id(images)]

    def prepare(self, sets: dict[str, ImageSet]) -> None:
        """Embed several sets in one Ray Data job (one actor pool start-up instead of one per set)."""
        sets = {role: images for role, images in sets.items() if id(images) not in self.done}
        self.folder.mkdir(parents=True, exist_ok=True)
        signatures = {role: _signatures(images) for role, images in sets.items()}
        found = _read_shards(self.folder)
        missing = {role: [i for i, s in enumerate(signatures[role]) if s not in found] for role in sets}
        if any(missing.values()):
            self._embed_shards(sets, signatures, missing)
            found = _read_shards(self.folder)
        for role, images in sets.items():
            lost = [images.keys[i] for i, s in enumerate(signatures[role]) if s not in found]
            if lost:
                raise DeepSSIMError(
                    f"{len(lost)} {role} image(s) have no embedding after the job, e.g. {lost[0]}"
                )
            self.done[id(images)] = np.stack([found[s] for s in signatures[role]]).astype(np.float32)

    def _embed_shards(self, sets: dict[str, ImageSet], signatures: dict, missing: dict) -> None:
        self.engine.ray()
        from ray import data as ray_data

        shards = []
        for number, role in enumerate(sets):
            for start in range(0, len(missing[role]), self.engine.shard_size):
                rows = missing[role][start : start + self.engine.shard_size]
                names = [signatures[role][i] for i in rows]
                shard = hashlib.sha256("".join(names).encode()).hexdigest()[:24]
                shards.append({"shard": shard, "set": number, "rows": rows, "signatures": names})
        context = ray_data.DataContext.get_current()
        context.enable_progress_bars = self.progress
        if self.progress:
            counts = ", ".join(f"{len(missing[role])} {role}" for role in sets)
            print(f"embedding {counts} images in {len(shards)} shard(s) on Ray")
        dataset = ray_data.from_items(shards, override_num_blocks=len(shards))
        dataset.map_batches(
            _EmbedShard,
            fn_constructor_kwargs={
                "metric": self.metric,
                "sets": list(sets.values()),
                "folder": str(self.folder),
                "batch_size": self.batch_size,
                "precision": self.precision,
                "threads": max(1, int(self.engine.cpus_per_worker)),
            },
            batch_size=1,
            compute=ray_data.ActorPoolStrategy(size=min(self.engine.workers, len(shards))),
            num_cpus=self.engine.cpus_per_worker,
            num_gpus=self.engine.gpus_per_worker or None,
        ).materialize()


class _EmbedShard:
    """A Ray Data actor: holds the model, embeds one shard per call and writes its Parquet file."""

    def __init__(
        self, metric, sets: list[ImageSet], folder: str, batch_size: int, precision: str, threads: int
    ):
        import torch

        torch.set_num_threads(threads)
        self.metric, self.sets, self.folder = metric, sets, Path(folder)
        self.batch_size, self.precision = batch_size, precision

    def __call__(self, batch: dict) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from deepssim.io.cache import image_fingerprints

        name = str(batch["shard"][0])
        rows = [int(r) for r in batch["rows"][0]]
        subset = self.sets[int(batch["set"][0])].subset(rows)
        vectors = np.asarray(
            self.metric.embed(subset.read(), self.batch_size, self.precision), dtype=np.float32
        )
        table = pa.table(
            {
                "key": subset.keys,
                "signature": [str(s) for s in batch["signatures"][0]],
                "content_sha256": image_fingerprints(subset),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
            }
        )
        temporary = self.folder / f".{name}.{os.getpid()}.tmp"
        pq.write_table(table, temporary)
        os.replace(temporary, self.folder / f"{name}.parquet")  # complete or absent
        return {"shard": [name], "images": [len(rows)]}
