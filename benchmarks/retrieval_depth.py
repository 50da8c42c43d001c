"""Retrieval depth: how many misaligned copies does the default scan's top k hold, and what does a
deeper k cost? (issue 25, item 5: choose the default -k by measurement.)

Recall: the generalisation protocol's misaligned copies (``duplicate_recall``'s queries: degraded,
flipped/rotated/shifted copies of each held-out bundled source's images, searched among all of
that source's images, neighbouring slices included) ranked by the default DeepSSIM model; the
share whose own image is in the top k, for k = 1, 5, 10, 20. The default model was trained on
pseudo-subjects only, so every bundled source is held out.

Cost: ``deepssim.scan`` of the bundled example (16 training x 48 generated 128x128 images, no
cache) with the default decision at each k, best of ``--repeats``, timed by stage; the ratio is
against k = 5 in the same run.

    PYTHONPATH=src python benchmarks/retrieval_depth.py [--queries 30] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEPTHS = (1, 5, 10, 20)


def main() -> None:
    import torch
    from generalisation import bundled_sources

    from deepssim import DeepSSIM, scan
    from deepssim.evaluation.generalisation import duplicate_recall
    from deepssim.hardware import cpu_description

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=30, help="copies per source")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}; torch threads {torch.get_num_threads()}")
    model = DeepSSIM.load("default")

    def rank(queries, gallery):
        similarity = model.embed(queries, precision="float32") @ model.embed(gallery, precision="float32").T
        return np.argsort(-similarity, axis=1, kind="stable")

    found = {k: [] for k in DEPTHS}
    print("\n| held-out source | copies | " + " | ".join(f"recall@{k}" for k in DEPTHS) + " |")
    print("|---|---|" + "---|" * len(DEPTHS))
    for source in bundled_sources():
        result = duplicate_recall(source, rank, args.queries, args.seed, depths=DEPTHS)
        recall = {k: result[f"recall_at_{k}"] for k in DEPTHS}
        n = min(args.queries, len(source.images))
        for k in DEPTHS:
            found[k].append(recall[k])
        print(f"| {source.name} | {n} | " + " | ".join(f"{recall[k]:.2f}" for k in DEPTHS) + " |")
    print("| mean | | " + " | ".join(f"{np.mean(found[k]):.3f}" for k in DEPTHS) + " |")

    example = Path(__file__).resolve().parents[1] / "data" / "example"
    print("\n| -k | scan seconds (best) | ratio to k=5 | register seconds | Duplicates |")
    print("|---|---|---|---|---|")
    reference = None
    for k in (5, 10, 20):
        best, stages, duplicates = float("inf"), {}, 0
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = scan(example / "train", example / "generated", k=k, cache=False)
            seconds = time.perf_counter() - started
            if seconds < best:
                best, stages = seconds, result.summary.seconds_by_stage
                duplicates = int((result.classes == 2).sum())
        reference = reference or best
        register = stages.get("register", float("nan"))
        print(f"| {k} | {best:.2f} | {best / reference:.2f} | {register:.2f} | {duplicates} |")


if __name__ == "__main__":
    main()
