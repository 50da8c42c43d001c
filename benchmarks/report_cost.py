"""What the report costs (issue 23): seconds and peak memory of ``ScanResult.save`` (the evidence
stage and the page), apart from the scan itself.

Two cases. **demo**: the bundled example (18 generated x 16 training images, 128 x 128), as
``make demo`` runs it: the scan (embeddings cached in a temporary file, warm) and the report, in
seconds of wall time and of CPU time. **large**: one pair of SIZE x SIZE images (default 2048; a
slice of data/sources/KmeansTest_T1UCharRaw.nii.gz brought to that size, and a rotated noisy copy
of it). The scan runs in one process and hands its result over (pickled); a fresh process then
only writes the report, so its peak resident memory (``getrusage``) is the report's (with Python,
torch and the result loaded: the baseline is printed too). Prints the CPU and the load average,
since the machine may be shared.

    .venv/bin/python benchmarks/report_cost.py [--size 2048] [--skip-demo] [--threads N]

``--threads`` sets torch's threads (default: torch's own, one per core): on a machine shared with
other jobs, 2 threads on 2 busy cores spin-wait and measure the load more than the code.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VOLUME = REPO / "data" / "sources" / "KmeansTest_T1UCharRaw.nii.gz"
DEMO_GROUPS = "^(ants_r[0-9]+|kmeans|mni|itk_[a-z0-9]+|dwi)"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(call):
    wall, cpu = time.perf_counter(), time.process_time()
    value = call()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def demo(scratch: Path) -> dict:
    from deepssim.scanning.scan import scan

    example = REPO / "data" / "example"
    cache = scratch / "demo-embeddings.sqlite"

    def run():
        return scan(example / "train", example / "generated", group_by=DEMO_GROUPS, cache=cache)

    run()  # fills the cache, as the first `make demo` does
    result, scan_wall, scan_cpu = timed(run)
    files, report_wall, report_cpu = timed(lambda: result.save(scratch / "demo-output", overwrite=True))
    return {
        "pairs_in_gallery": min(24, len(result.generated_keys)),
        "scan_s": round(scan_wall, 2),
        "scan_cpu_s": round(scan_cpu, 2),
        "report_s": round(report_wall, 2),
        "report_cpu_s": round(report_cpu, 2),
        "report_share": round(report_wall / (scan_wall + report_wall), 2),
        "report_kb": files["report"].stat().st_size // 1024,
    }


def make_large_pair(folder: Path, size: int) -> None:
    import nibabel as nib
    from scipy import ndimage

    volume = np.asarray(nib.load(VOLUME).dataobj, dtype=np.float64)
    slice_ = volume[:, :, volume.shape[2] // 2]
    image = ndimage.zoom(slice_, (size / slice_.shape[0], size / slice_.shape[1]), order=1)
    rng = np.random.default_rng(0)
    copy = ndimage.rotate(image, 7, reshape=False, order=1, mode="nearest")
    copy = copy + rng.normal(scale=0.02 * image.std(), size=copy.shape)
    (folder / "train").mkdir()
    (folder / "generated").mkdir()
    np.save(folder / "train" / "slice.npy", image.astype(np.float32))
    np.save(folder / "generated" / "copy.npy", copy.astype(np.float32))


def large_scan(folder: Path) -> None:
    """In its own process: scan the pair and pickle the result for the report process."""
    from deepssim.scanning.scan import scan

    result, wall, _ = timed(lambda: scan(folder / "train", folder / "generated", k=1, cache=False))
    with open(folder / "result.pickle", "wb") as handle:
        pickle.dump(result, handle)
    print(json.dumps({"scan_s": round(wall, 2), "scan_peak_mb": round(peak_mb())}))


def large_report(folder: Path) -> None:
    """In its own process: load the result, then write the report only."""
    import torch  # noqa: F401 - loaded before the baseline, as the report needs it

    with open(folder / "result.pickle", "rb") as handle:
        result = pickle.load(handle)
    baseline = peak_mb()
    files, wall, cpu = timed(lambda: result.save(folder / "out"))
    print(
        json.dumps(
            {
                "report_s": round(wall, 2),
                "report_cpu_s": round(cpu, 2),
                "baseline_peak_mb": round(baseline),
                "report_peak_mb": round(peak_mb()),
                "report_kb": files["report"].stat().st_size // 1024,
            }
        )
    )


def child(mode: str, folder: Path) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, f"--{mode}", str(folder)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--large-scan", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--large-report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the child processes
    if args.large_scan:
        return large_scan(args.large_scan)
    if args.large_report:
        return large_report(args.large_report)

    from deepssim.hardware import cpu_description

    print(f"CPU: {cpu_description()}; load average before: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if not args.skip_demo:
            print("demo:", json.dumps(demo(scratch)))
        folder = scratch / "large"
        folder.mkdir()
        make_large_pair(folder, args.size)
        numbers = {"size": args.size, **child("large-scan", folder), **child("large-report", folder)}
        print(f"one {args.size}x{args.size} pair:", json.dumps(numbers))
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
