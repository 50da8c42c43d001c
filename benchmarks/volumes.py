"""The volume benchmark: does ``scan --unit volume`` call every planted whole copy a Duplicate, no
different subject a Duplicate, and find and place partial copies by slab? Against the slice-level
scan of the same volumes.

Volumes (all read as RAS, resampled to 3 mm, centre-cropped or padded to one 64x76x64 grid):
training = pseudo-subjects of ``deepssim.training.synthetic`` (seed 0..) and the bundled real
volumes (MNI T1 template, ITK KmeansTest T1); generated =
- copies of training volumes: rigidly moved (rotation up to 10 deg about each axis, shift up to 3
  voxels), noised, blurred and intensity-changed (gamma), each also a little noised;
- partial copies: a slab of 12 axial slices of a training volume in a held-out subject's volume;
- neighbours: a training volume under a smooth elastic deformation (same subject, deformed);
- different subjects: held-out pseudo-subjects and the bundled nibabel anatomical volume.

    PYTHONPATH=src python benchmarks/volumes.py [--subjects 6] [--out build/volumes]

Prints the CPU, per-kind classes of the volume scan and of the slice scan (a volume counts as
flagged by the slice scan when any of its slices is a Duplicate), slab placement and timings.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import shutil
import time
from pathlib import Path

import numpy as np
from scipy import ndimage


def _example_builder():
    """data/build_volume_example.py: the grid, the bundled and synthetic volumes, the planted edits."""
    path = Path(__file__).resolve().parents[1] / "data" / "build_volume_example.py"
    spec = importlib.util.spec_from_file_location("build_volume_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE = _example_builder()
GRID = EXAMPLE.GRID


def elastic(volume: np.ndarray, rng, magnitude: float = 2.0, smooth: float = 5.0) -> np.ndarray:
    """A smooth random deformation (the same subject, deformed): displacements of standard
    deviation ``magnitude`` voxels, smooth over ``smooth`` voxels, in one cubic resampling."""
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in volume.shape], indexing="ij")
    moved = []
    for g in grid:
        field = ndimage.gaussian_filter(rng.normal(size=volume.shape), smooth)
        moved.append(g + magnitude * field / field.std())
    return ndimage.map_coordinates(volume, moved, order=3, mode="nearest")


def build(out: Path, subjects: int, seed: int) -> list[dict]:
    """Write train/ and generated/ NIfTI folders and truth.csv; return the truth rows."""
    rng = np.random.default_rng(seed)
    synthetic, real, noisy, save = EXAMPLE.synthetic, EXAMPLE.real, EXAMPLE.noisy, EXAMPLE.save
    train_dir, generated_dir = out / "train", out / "generated"
    for folder in (train_dir, generated_dir):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    train = {f"synth-{s:02d}": synthetic(s) for s in range(subjects)}
    train["real-mni"] = real("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    train["real-kmeans"] = real("KmeansTest_T1UCharRaw.nii.gz")
    for name, volume in train.items():
        save(train_dir, name, volume)
    held_out = [synthetic(100 + s) for s in range(3)] + [real("anatomical.nii")]
    truth = []

    def plant(name, volume, kind, source=None, slab=None):
        save(generated_dir, name, volume)
        truth.append({"generated_key": name, "kind": kind, "source": source or "", "slab": slab or ""})

    names = list(train)
    for n, source in enumerate(names[:4]):
        volume = train[source]
        plant(f"copy-rigid-{n}", noisy(EXAMPLE.rigid(volume, rng), rng, 0.01), "copy: rigid", source)
        plant(f"copy-noise-{n}", noisy(volume, rng, 0.02), "copy: noise 2%", source)
        plant(f"copy-blur-{n}", noisy(ndimage.gaussian_filter(volume, 0.8), rng, 0.01), "copy: blur", source)
        low = volume.min()
        gamma = low + np.ptp(volume) * ((volume - low) / np.ptp(volume)) ** rng.uniform(0.6, 0.8)
        plant(f"copy-gamma-{n}", noisy(gamma, rng, 0.01), "copy: intensity", source)
    for level in (0.01, 0.03, 0.05):  # how much noise a copy may carry and still be a Duplicate
        noise_copy = noisy(train[names[1]], rng, level)
        plant(f"copy-noise-{level:.2f}", noise_copy, f"copy: noise {level:.0%} (of {names[1]})", names[1])
    for n, source in enumerate(names[:3]):
        first = int(rng.integers(14, GRID[2] - 26))
        host = EXAMPLE.with_slab(held_out[n], train[source], first)
        plant(f"partial-{n}", host, "partial copy (12 axial slices)", source, f"{first}-{first + 11}")
    for n, source in enumerate(names[:3]):
        plant(f"neighbour-{n}", elastic(train[source], rng), "neighbour: same subject, deformed", source)
    for n, volume in enumerate(held_out):
        plant(f"different-{n}", volume, "different subject")
    EXAMPLE.write_truth(out / "truth.csv", truth)
    return truth


def slice_scan(out: Path) -> dict[str, str]:
    """The image scan of the same volumes' axial slices: each generated volume's worst class."""
    from deepssim import LoadOptions, scan
    from deepssim.labels import Label

    result = scan(out / "train", out / "generated", options=LoadOptions(plane="axial"), cache=False)
    worst: dict[str, int] = {}
    for key, label in zip(result.generated_keys, result.classes, strict=True):
        volume = key.split("#", 1)[0]
        worst[volume] = max(worst.get(volume, 0), int(label))
    return {volume: Label(code).title for volume, code in worst.items()}


def main() -> None:
    import torch

    from deepssim.hardware import cpu_description
    from deepssim.scanning.volumes import VolumeScanSettings, scan_volumes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=6, help="training pseudo-subjects")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--out", default="build/volumes")
    args = parser.parse_args()
    out = Path(args.out)
    print(f"CPU: {cpu_description()}; torch threads {torch.get_num_threads()}")
    started = time.time()
    truth = build(out, args.subjects, args.seed)
    print(f"built {len(truth)} generated volumes in {time.time() - started:.0f} s")
    rows = {}
    for retrieval in ("votes", "pooled"):
        started = time.time()
        result = scan_volumes(
            out / "train", out / "generated", settings=VolumeScanSettings(k=args.k, retrieval=retrieval)
        )
        seconds = time.time() - started
        scan_dir = out / f"scan_{retrieval}"
        result.save(scan_dir, overwrite=True, report=retrieval == "votes")
        with open(scan_dir / "results.csv", newline="") as handle:
            rows[retrieval] = {r["generated_key"]: r for r in csv.DictReader(handle)}
        with open(scan_dir / "pairs.csv", newline="") as handle:
            candidates: dict[str, list] = {}
            for r in csv.DictReader(handle):
                candidates.setdefault(r["generated_key"], []).append(
                    (float(r["retrieval_score"]), r["train_key"])
                )
        sourced = [t for t in truth if t["source"]]
        first = sum(max(candidates[t["generated_key"]])[1] == t["source"] for t in sourced)
        within = sum(t["source"] in {k for _, k in candidates[t["generated_key"]]} for t in sourced)
        print(
            f"retrieval {retrieval}: the source volume ranked first for {first} of {len(sourced)} "
            f"volumes with a source, within the top {args.k} for {within}"
        )
        print(f"volume scan ({retrieval}): {seconds:.0f} s; stages {result.stages}")
    started = time.time()
    slices = slice_scan(out)
    print(f"slice scan: {time.time() - started:.0f} s")
    kinds: dict[str, dict] = {}
    for t in truth:
        key = t["generated_key"]
        empty = {"n": 0, "votes": {}, "pooled": {}, "slice": {}, "source_top1": 0}
        entry = kinds.setdefault(t["kind"], empty)
        entry["n"] += 1
        for retrieval in ("votes", "pooled"):
            label = rows[retrieval][key]["class"]
            entry[retrieval][label] = entry[retrieval].get(label, 0) + 1
        entry["slice"][slices[key]] = entry["slice"].get(slices[key], 0) + 1
        found = rows["votes"][key]
        if t["source"] and found["top1_train_key"] == t["source"]:
            entry["source_top1"] += 1
        if t["slab"]:
            placed = found["copied_slabs"] or "none"
            entry.setdefault("slabs", []).append(f"planted {t['slab']}, found {placed}")
    print(
        "\n| generated | n | volume scan (votes) | volume scan (pooled) | slice scan (any slice) "
        "| source is the best pair (votes) |"
    )
    print("|---|---|---|---|---|---|")
    for kind, e in kinds.items():

        def fmt(counts):
            return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))

        source = f"{e['source_top1']} of {e['n']}" if kind != "different subject" else "-"
        cells = [kind, e["n"], fmt(e["votes"]), fmt(e["pooled"]), fmt(e["slice"]), source]
        print("| " + " | ".join(map(str, cells)) + " |")
    for kind, e in kinds.items():
        for line in e.get("slabs", []):
            print(f"{kind}: {line}")
    (out / "benchmark.json").write_text(json.dumps(kinds, indent=1))


if __name__ == "__main__":
    main()
