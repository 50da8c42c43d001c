"""Embedding throughput (images/s) of every architecture on this machine, through the public
API (`DeepSSIM.embed`, z-scoring included), float32 and bfloat16 autocast, in one run.

    .venv/bin/python benchmarks/embed_throughput.py [--size 128x128 --images 512]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from deepssim import DeepSSIM
from deepssim.embedding.model import make_config
from deepssim.embedding.networks import ARCHITECTURES, build_network
from deepssim.hardware import cpu_description
from deepssim.io.normalise import parse_size


def throughput(model: DeepSSIM, images: np.ndarray, precision: str, repeats: int) -> float:
    model.embed(images[:64], precision=precision)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        model.embed(images, batch_size=64, precision=precision)
        best = min(best, time.perf_counter() - started)
    return len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="128x128")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    shape = parse_size(args.size)
    images = np.random.default_rng(0).normal(size=(args.images, *shape)).cumsum(1).cumsum(2)
    print(f"CPU: {cpu_description()}")
    print(f"{args.images} images of {shape[0]}x{shape[1]}, torch threads {torch.get_num_threads()}")
    for architecture in ARCHITECTURES:
        torch.manual_seed(0)
        network = build_network(architecture)
        model = DeepSSIM(network, make_config(architecture, network.input_channels, 256))
        count = images if architecture == "deepssim_fast" else images[:128]
        for precision in ("float32", "bfloat16"):
            rate = throughput(model, count, precision, args.repeats if architecture == "deepssim_fast" else 1)
            print(f"{architecture:<18} {precision:<9} {rate:8.0f} images/s")


if __name__ == "__main__":
    main()
