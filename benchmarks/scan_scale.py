"""A scan at the paper's scale: 2,195 training x 65,850 generated images of 136x112.

Writes the images once as PNG files (procedural variations of the bundled example slices:
shifts, intensity changes and noise), then times `deepssim scan` with the default DeepSSIM
model in a child process and reads its peak memory (max RSS). Exact SSIM at that scale is
extrapolated from a measured block of the same images.

    .venv/bin/python benchmarks/scan_scale.py [--train 2195 --generated 65850 --workdir build/bench-scan]
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from deepssim import ImageSet, load_images
from deepssim.hardware import cpu_description
from deepssim.ssim.matrix import top_k_ssim

REPO = Path(__file__).resolve().parents[1]
SHAPE = (136, 112)


def make_images(folder: Path, count: int, seed: int) -> None:
    if folder.is_dir() and len(list(folder.glob("*.png"))) == count:
        return
    folder.mkdir(parents=True, exist_ok=True)
    _, bases = load_images(REPO / "data" / "example" / "train")
    left = (bases.shape[2] - SHAPE[1]) // 2
    rows = (SHAPE[0] - bases.shape[1]) // 2
    padded = np.pad(bases, ((0, 0), (rows, rows), (0, 0)), mode="edge")[:, :, left : left + SHAPE[1]]
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = padded[rng.integers(len(padded))]
        image = np.roll(image, tuple(rng.integers(-6, 7, 2)), axis=(0, 1))
        image = (image - image.min()) / np.ptp(image)
        image = image ** rng.uniform(0.7, 1.4) + rng.normal(0, rng.uniform(0.01, 0.05), SHAPE)
        pixels = np.clip(image * 255, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:06d}.png", compress_level=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=2195)
    parser.add_argument("--generated", type=int, default=65850)
    parser.add_argument("--workdir", default="build/bench-scan")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--k", type=int, default=10, help="retrieval depth (the scan's -k)")
    parser.add_argument(
        "--ssim-block", type=int, default=2048, help="generated images in the SSIM block (0: skip)"
    )
    parser.add_argument(
        "--registration", nargs="+", default=["cascade", "full"], help="scan once per registration mode"
    )
    args = parser.parse_args()
    work = Path(args.workdir)
    started = time.perf_counter()
    make_images(work / "train", args.train, 1)
    make_images(work / "generated", args.generated, 2)
    elapsed = time.perf_counter() - started
    print(f"CPU: {cpu_description()}")
    print(f"images ready in {elapsed:.0f} s ({args.train} training, {args.generated} generated)")

    for registration in args.registration:
        run_scan(args, work, registration)
    if args.ssim_block:
        exact_ssim(args, work)


def run_scan(args, work: Path, registration: str) -> None:
    command = [
        str(Path(sys.executable).parent / "deepssim"),
        "scan",
        "--train",
        str(work / "train"),
        "--generated",
        str(work / "generated"),
        "--out",
        str(work / "out"),
        "--overwrite",
        "--no-cache",
        "--precision",
        args.precision,
        "--no-progress",
        "--registration",
        registration,
        "-k",
        str(args.k),
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # the largest child so far
    if done.returncode != 0:
        sys.exit(done.stderr)
    print(" ".join(command))
    print(done.stdout.strip())
    summary = json.loads((work / "out" / "summary.json").read_text())
    print(f"seconds by stage: {summary.get('seconds_by_stage')}")
    classes = {}
    with open(work / "out" / "results.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            classes[row["generated_key"]] = row["class"]
    (work / f"classes-{registration}-k{args.k}.json").write_text(json.dumps(classes))
    print(f"classes: {dict(Counter(classes.values()))}")
    other = work / f"classes-{'full' if registration == 'cascade' else 'cascade'}-k{args.k}.json"
    if other.exists():
        before = json.loads(other.read_text())
        same = sum(before.get(key) == value for key, value in classes.items())
        print(f"same class as the other registration mode: {same}/{len(classes)}")
    print(
        f"DeepSSIM scan ({args.precision}, --registration {registration}): {seconds:.0f} s wall, "
        f"peak memory of the largest child so far {peak:.2f} GiB"
    )


def exact_ssim(args, work: Path) -> None:

    train = ImageSet.from_paths(work / "train")
    generated = ImageSet.from_paths(work / "generated")
    block = ImageSet(generated.refs[: args.ssim_block], generated.shape, generated.options)
    started = time.perf_counter()
    top_k_ssim(train, block, 5)
    seconds = time.perf_counter() - started
    pairs = len(train) * len(block)
    total = args.train * args.generated
    print(
        f"exact SSIM top-5: {pairs:,} pairs in {seconds:.0f} s = {pairs / seconds:,.0f} pairs/s; "
        f"{total:,} pairs extrapolated: {total / (pairs / seconds) / 60:.0f} min"
    )


if __name__ == "__main__":
    main()
