"""The CUDA code paths, checked against the CPU and scikit-image, with their throughput.

    PYTHONPATH=src python benchmarks/cuda_check.py      # on a machine with a CUDA GPU

Runs without the compiled SSIM kernel (as on a machine without a C compiler), so the SSIM engine
uses its PyTorch backend. Checks: the SSIM matrix on CUDA against scikit-image; registered SSIM
on CUDA against the CPU; DeepSSIM embeddings on CUDA against the CPU (float32 and bfloat16); a
short training run on CUDA (float16 and bfloat16 autocast); a scan on CUDA against a scan on the
CPU. Prints one line per check, PASS or FAIL, and the pairs or images per second.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity

import deepssim
from deepssim.hardware import cpu_description
from deepssim.io.normalise import zscore
from deepssim.ssim.registered import RegistrationSettings, register_cascade, register_indexed

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "data" / "example"
FAILED = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def timed(function, device: str = "cuda"):
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    synchronize()
    started = time.perf_counter()
    out = function()
    synchronize()
    return out, time.perf_counter() - started


def images(count: int, seed: int, shape=(136, 112)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(count, *shape)).cumsum(1).cumsum(2)


def registration_check(device: str, pairs: int = 16384, compared: int = 512) -> None:
    """Registered SSIM on ``device`` (the tensor path: search, candidates and their exact SSIM on
    the device) against the CPU: classes at (0.6, 0.85) and scores on ``compared`` pairs
    of copies (flipped, shifted, noisy) and different images; then throughput over ``pairs`` pairs
    (k = 8 per generated image), full registration and the cascade."""
    rng = np.random.default_rng(5)
    train = images(512, 5)
    copies = train[: pairs // 16, ::-1, :] + rng.normal(0, 0.5, (pairs // 16, 136, 112))
    generated = np.concatenate([np.roll(copies, 3, axis=2), images(pairs // 16, 6)])
    ti = rng.integers(0, len(train), (len(generated), 8))
    ti[: pairs // 16, 0] = np.arange(pairs // 16)  # each copy's source among its 8
    ti, gi = ti.ravel(), np.repeat(np.arange(len(generated)), 8)
    settings = RegistrationSettings(device=device)
    pick = np.r_[: compared // 2, len(ti) // 2 : len(ti) // 2 + compared // 2]
    cpu = register_indexed(train, generated, ti[pick], gi[pick])
    on_device = register_indexed(train, generated, ti[pick], gi[pick], settings=settings)

    def classes(scores):
        return np.where(scores > 0.85, 2, np.where(scores <= 0.6, 0, 1))

    same = float(np.mean(classes(cpu.ssim_registered) == classes(on_device.ssim_registered)))
    difference = float(np.abs(cpu.ssim_registered - on_device.ssim_registered).max())
    check(
        f"registered SSIM on {device} vs the CPU",
        same == 1.0 and difference < 1e-3,
        f"{compared} pairs, same class {same:.4f}, max |diff| {difference:.1e}",
    )
    for name, run in (
        ("full registration", lambda: register_indexed(train, generated, ti, gi, settings=settings)),
        ("cascade", lambda: register_cascade(train, generated, ti, gi, (0.6, 0.85), settings=settings)),
    ):
        _, seconds = timed(run, device)
        check(f"{name} throughput on {device}", True, f"{len(ti) / seconds:,.0f} pairs/s (136x112)")


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    print(f"CPU: {cpu_description()}; GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    from deepssim.ssim import engine

    print(f"compiled SSIM kernel present: {engine._ssim_kernel is not None}")

    train, generated = images(16, 1), images(24, 2)
    matrix = deepssim.ssim_matrix(train, generated, dtype=np.float64, backend="torch", device="cuda")
    za, zb = zscore(train), zscore(generated)
    expected = np.array([[structural_similarity(a, b, data_range=a.max() - a.min()) for b in zb] for a in za])
    difference = float(np.abs(matrix - expected).max())
    check(
        "SSIM matrix, torch backend on CUDA, float64",
        difference < 1e-5,
        f"max |diff| vs scikit-image {difference:.1e}",
    )
    big_train, big_generated = images(512, 3), images(1024, 4)
    deepssim.ssim_matrix(big_train[:8], big_generated[:8], backend="torch", device="cuda")
    _, seconds = timed(lambda: deepssim.ssim_matrix(big_train, big_generated, backend="torch", device="cuda"))
    check(
        "SSIM matrix throughput on CUDA",
        True,
        f"{512 * 1024 / seconds:,.0f} pairs/s float32 (512 x 1024, 136x112)",
    )

    registration_check("cuda")

    model_cpu = deepssim.DeepSSIM.load("default")
    model_gpu = deepssim.DeepSSIM.load("default", device="cuda")
    batch = images(256, 7, (128, 128))
    reference = model_cpu.embed(batch, precision="float32")
    for precision, tolerance in (("float32", 1e-3), ("bfloat16", 3e-2)):
        got = model_gpu.embed(batch, precision=precision)
        difference = float(np.abs(got - reference).max())
        check(
            f"embedding on CUDA, {precision}",
            difference < tolerance,
            f"max |diff| vs CPU float32 {difference:.1e}",
        )
        model_gpu.embed(batch[:64], precision=precision)
        _, seconds = timed(
            lambda precision=precision: model_gpu.embed(
                np.tile(batch, (8, 1, 1)), batch_size=256, precision=precision
            )
        )
        check(f"embedding throughput on CUDA, {precision}", True, f"{2048 / seconds:,.0f} images/s (128x128)")

    from deepssim.training.train import TrainSettings
    from deepssim.training.train import train as train_model

    with tempfile.TemporaryDirectory() as folder:
        for precision in ("float16", "bfloat16"):
            settings = TrainSettings(epochs=2, n_pairs=256, batch_size=32, precision=precision, device="cuda")
            run = Path(folder) / precision
            (result, seconds) = timed(
                lambda settings=settings, run=run: train_model(EXAMPLE / "train", run, settings)
            )
            finite = all(np.isfinite(row["train_mse"]) for row in result.log)
            check(
                f"training on CUDA, {precision}",
                finite,
                f"2 epochs of 256 pairs in {seconds:.1f} s, "
                f"validation MAE {result.log[-1]['val_aligned_mae']:.3f}",
            )

    on_cpu = deepssim.scan(EXAMPLE / "train", EXAMPLE / "generated", cache=False, precision="float32")
    on_gpu = deepssim.scan(
        EXAMPLE / "train", EXAMPLE / "generated", cache=False, precision="float32", device="cuda"
    )
    same = on_cpu.classes.tolist() == on_gpu.classes.tolist()
    difference = float(np.abs(on_cpu.scores - on_gpu.scores).max())
    check(
        "scan on CUDA vs CPU",
        same and difference < 1e-3,
        f"same classes: {same}, max |score diff| {difference:.1e}",
    )
    print(f"{len(FAILED)} failed: {', '.join(FAILED) or 'none'}")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
