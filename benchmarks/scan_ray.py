"""The scan on a local Ray cluster of this machine against the local engine.

    python benchmarks/scan_ray.py scan --train 2195 --generated 65850 --workers 1 2
    python benchmarks/scan_ray.py search --train 2195 --generated 1000000

``scan``: the paper-scale job (2,195 training x 65,850 generated images of 128x128, PNG files
made once with seeded shifts, gamma and noise: training images from the bundled training
slices, generated images from the bundled held-out subjects) with the score decision and
thresholds 0.99 / 0.995, so that the registration of Duplicates (the same Ray tasks as the
two-stage decision's) stays small
(DeepSSIM decides; the two-stage registration of 329k pairs would take about 12 minutes per
engine here and runs as the same kind of Ray task): seconds per stage (index, embed, search,
decide, report) and peak resident memory of the driver and of every Ray worker.
``search``: the search stage alone with synthetic unit embeddings (no images), 1,000,000
generated images by default.

Each run is a fresh process, so peak memory is its own. Prints the CPU and ratios to the local
engine measured in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from deepssim.hardware import cpu_description

ROOT = Path(__file__).resolve().parents[1]
# The cosine calls many of these look-alike synthetic images Duplicates at the paper's 0.85,
# and every Duplicate is registered (about 200 pairs/s here): high thresholds keep that stage
# small, so the timing shows the stages the engines differ in (read, embed, search, report).
STAGE_THRESHOLDS = (0.99, 0.995)


def make_images(folder: Path, count: int, seed: int, sources: list[Path]) -> Path:
    """``count`` 128x128 PNGs made from the bundled images with seeded shifts, gamma and noise."""
    from PIL import Image

    from deepssim.io.load import load_images

    if folder.is_dir() and len(list(folder.glob("*.png"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    _, base = load_images(sources)
    rng = np.random.default_rng(seed)
    for n in range(count):
        image = base[n % len(base)]
        image = (image - image.min()) / max(np.ptp(image), 1e-12)
        image = np.roll(image, tuple(rng.integers(-6, 7, 2)), axis=(0, 1)) ** rng.uniform(0.7, 1.4)
        image = np.clip(image + rng.normal(0, rng.uniform(0.005, 0.05), image.shape), 0, 1)
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"img_{n:07d}.png")
    return folder


def worker_peak_megabytes() -> list[float]:
    """Peak resident memory (VmHWM) of every live Ray worker process, in MB."""
    peaks = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            command = (status.parent / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "default_worker.py" in command or command.startswith("ray::"):
            for line in text.splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) / 1024)
    return peaks


def run_scan(args) -> dict:
    from deepssim import scan
    from deepssim.execution.ray_engine import RayEngine

    engine = "local"
    if args.engine == "ray":
        import ray

        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
        engine = RayEngine(workers=args.workers, shard_dir=Path(args.scratch) / f"shards-{args.workers}")
    started = time.perf_counter()
    result = scan(
        args.train_dir,
        args.generated_dir,
        decision="score",
        thresholds=STAGE_THRESHOLDS,
        cache=False,
        precision="float32",
        engine=engine,
    )
    saved = time.perf_counter()
    result.save(Path(args.scratch) / f"out-{args.engine}-{args.workers}", gallery_size=24, overwrite=True)
    stages = dict(result.summary.seconds_by_stage)
    stages["report"] = time.perf_counter() - saved
    return {
        "stages": stages,
        "total": time.perf_counter() - started,
        "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_mb": max(worker_peak_megabytes(), default=0.0),
        "duplicates": result.summary.generated_by_class,
    }


def run_search(args) -> dict:
    from deepssim.execution.engines import LocalEngine
    from deepssim.execution.ray_engine import RayEngine

    rng = np.random.default_rng(0)

    def unit(n):
        vectors = rng.standard_normal((n, 256), dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    train, generated = unit(args.train), unit(args.generated)
    engine = LocalEngine()
    if args.engine == "ray":
        import ray

        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
        engine = RayEngine(workers=args.workers)
    started = time.perf_counter()
    scores, indices, best = engine.top_k(generated, train, 5)
    return {
        "stages": {"search": time.perf_counter() - started},
        "total": time.perf_counter() - started,
        "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_mb": max(worker_peak_megabytes(), default=0.0),
        "checksum": float(scores[:, 0].sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=("scan", "search"))
    parser.add_argument("--train", type=int, default=2195)
    parser.add_argument("--generated", type=int, default=65850)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--scratch", default="build/scan_ray")
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # one measured run, in a child process
    parser.add_argument("--train-dir", help=argparse.SUPPRESS)
    parser.add_argument("--generated-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        args.workers = args.workers[0]
        print(json.dumps(run_scan(args) if args.job == "scan" else run_search(args)))
        return

    print(f"CPU: {cpu_description()}")
    scratch = Path(args.scratch)
    extra = []
    if args.job == "scan":
        example = ROOT / "data" / "example"
        train = make_images(scratch / f"train-{args.train}", args.train, 1, example / "train")
        generated = make_images(
            scratch / f"generated-{args.generated}", args.generated, 2, example / "generated"
        )
        extra = ["--train-dir", str(train), "--generated-dir", str(generated)]
    runs = {"local": ["--engine", "local", "--workers", "1"]}
    runs.update({f"ray x{w}": ["--engine", "ray", "--workers", str(w)] for w in args.workers})
    results = {}
    for name, flags in runs.items():
        command = [
            sys.executable,
            __file__,
            args.job,
            "--train",
            str(args.train),
            "--generated",
            str(args.generated),
        ]
        command += ["--scratch", str(scratch), "--cpus", str(args.cpus), *flags, *extra]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    local = results["local"]["total"]
    order = ("index", "embed", "search", "references", "register", "decide", "report")
    stages = [s for s in order if any(s in r["stages"] for r in results.values())]
    print(f"\n{args.job}: {args.train} training x {args.generated} generated")
    print(
        "| engine | " + " | ".join(stages) + " | total (s) | / local | driver peak (MB) | worker peak (MB) |"
    )
    print("| --- " * (len(stages) + 5) + "|")
    for name, r in results.items():
        cells = " | ".join(f"{r['stages'].get(s, 0):.1f}" for s in stages)
        print(
            f"| {name} | {cells} | {r['total']:.1f} | {r['total'] / local:.2f} | {r['driver_peak_mb']:.0f} | "
            f"{r['worker_peak_mb']:.0f} |"
        )
    (scratch / f"{args.job}.json").write_text(
        json.dumps({"cpu": cpu_description(), "results": results}, indent=1)
    )


if __name__ == "__main__":
    main()
