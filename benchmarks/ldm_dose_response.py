"""The case study as a dose-response experiment: memorisation against duplication in one run.

One latent diffusion model (the small MONAI LDM of ``deepssim ldm``) is trained on a set of
more than 1,000 unique 64x64 slices (synthetic pseudo-subjects, 6 well separated slices each,
plus slices of the bundled real volumes and images) in which a seeded subset is repeated at
graded counts (by default 20 images each x4, x16 and x64, the rest x1). Carlini et al. (2023)
and Somepalli et al. (2023) found that duplicated training examples are extracted far more
often than unique ones; here the question is whether DeepSSIM measures that dose-response.

A control set of slices of further pseudo-subjects that the model never sees (x0) is scanned
alongside the training images: how often a generated image is called a Duplicate of an image
the model never saw is the chance level that x1 must be compared with.

Why the LDM and not a pixel-space DDPM: on one CPU core a UNet step on 16x16x3 latents takes
~0.2 s at batch 32, a pixel-space UNet on 64x64x1 several times that, so the LDM sees far more
images in the same time. The autoencoder is trained on the unique images, each once, so that it
does not itself favour the repeated images; only the diffusion model sees the repeats.

Stages (each resumes or is skipped when its output exists): ``data`` (the folders and
``counts.csv``), ``train`` (autoencoder, then the diffusion model with the memorisation monitor
logging every sample's best match), ``generate``, ``scan`` (DeepSSIM two-stage, plain SSIM,
and Dar et al. when ``--dar-epochs`` > 0), ``audit`` (brute-force exact SSIM of every generated
image against every training image), ``dedup`` (``deepssim dedup`` of the training files),
``dedup-model`` (a second diffusion model, same autoencoder and the same number of steps, trained
on the files dedup kept: the privacy measure "deduplicate first", and a model without duplicates
for x1 to be compared with; then its generation, scan and audit), ``report`` (results.json,
figures).

    PYTHONPATH=src python benchmarks/ldm_dose_response.py --workdir build/dose
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

SUBJECT = r"^(synth-\d+|real-[A-Za-z0-9]+)_"  # the subject (patient) of every image key
SIZE = (64, 64)
STAGES = ("data", "train", "generate", "scan", "audit", "dedup", "dedup-model", "report")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def save_png(path: Path, image: np.ndarray) -> None:
    image = np.asarray(image, dtype=np.float64)
    scaled = (image - image.min()) / max(float(np.ptp(image)), 1e-12)
    Image.fromarray(np.round(scaled * 65535).astype(np.uint16)).save(path)


# --- data ------------------------------------------------------------------------------------


def synthetic_subject_slices(seed: int, subject: int) -> list[tuple[str, np.ndarray]]:
    """Six slices of one pseudo-subject: the first and last of 15 slices along each axis, so
    that no two are neighbours (at least 14 slices, 21 mm, apart)."""
    from deepssim.training.synthetic import subject_seed, synthetic_slices

    images, axes, indices = synthetic_slices(subject_seed(seed, subject), 45, size=SIZE)
    out = []
    for axis in range(3):
        rows = np.flatnonzero(axes == axis)
        rows = rows[np.argsort(indices[rows])]
        for row in (rows[0], rows[-1]):
            out.append((f"synth-{subject:04d}_a{axis}_{indices[row]:03d}", images[row]))
    return out


def real_slices(every: int) -> list[tuple[str, np.ndarray]]:
    """Every ``every``-th slice of the bundled real volumes (each axis) and each bundled 2D image."""
    import importlib.util

    from skimage.transform import resize

    spec = importlib.util.spec_from_file_location(
        "build_training_slices", Path(__file__).resolve().parents[1] / "data" / "build_training_slices.py"
    )
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    out = []
    for name, axes in builder.VOLUMES.items():
        volume = name.split(".")[0].replace("_", "")[:24]
        for stem, stack in builder.volume_stacks(name, axes).items():
            axis = stem[-1]
            for i in range(every // 2, len(stack), every):
                small = resize(stack[i], SIZE, anti_aliasing=True, preserve_range=True)
                out.append((f"real-{volume}_a{axis}_{i:03d}", small))
    for name in builder.IMAGES:
        with Image.open(builder.SOURCES / name) as image:
            gray = np.asarray(image.convert("L"), dtype=np.float64)
        square = builder.square(gray, (1.0, 1.0))
        stem = Path(name).stem.replace("_", "")
        out.append((f"real-{stem}_2d_000", resize(square, SIZE, anti_aliasing=True, preserve_range=True)))
    return out


def build_data(work: Path, args) -> dict:
    """unique/ (each training image once), train/ (with the repeats, what the diffusion model
    trains on), control/ (x0: pseudo-subjects never trained on) and counts.csv."""
    data = work / "data"
    counts_file = data / "counts.csv"
    if counts_file.is_file():
        return read_counts(work)
    unique, control, train = data / "unique", data / "control", data / "train"
    for folder in (unique, control, train):
        folder.mkdir(parents=True, exist_ok=True)
    items = []
    for subject in range(args.subjects + args.control_subjects):
        role = "train" if subject < args.subjects else "control"
        items += [(key, image, role) for key, image in synthetic_subject_slices(args.subject_seed, subject)]
        if subject % 25 == 0:
            log(f"synthetic subject {subject}")
    items += [(key, image, "train") for key, image in real_slices(args.real_every)]
    training = [i for i, item in enumerate(items) if item[2] == "train"]
    rng = np.random.default_rng([args.seed, 26])
    chosen = rng.choice(training, size=len(args.doses) * args.per_dose, replace=False)
    count = {i: 1 for i in training}
    for n, dose in enumerate(args.doses):
        for i in chosen[n * args.per_dose : (n + 1) * args.per_dose]:
            count[int(i)] = dose
    rows = []
    for i, (key, image, role) in enumerate(items):
        if role == "control":
            save_png(control / f"{key}.png", image)
            rows.append({"key": key, "subject": key.split("_")[0], "role": role, "count": 0})
            continue
        save_png(unique / f"{key}.png", image)
        for copy in range(count[i]):
            save_png(train / (f"{key}.png" if copy == 0 else f"{key}__copy{copy:02d}.png"), image)
        rows.append({"key": key, "subject": key.split("_")[0], "role": role, "count": count[i]})
    tmp = counts_file.with_suffix(".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.rename(counts_file)
    return read_counts(work)


def read_counts(work: Path) -> dict:
    with open(work / "data" / "counts.csv", newline="") as handle:
        return {row["key"]: {**row, "count": int(row["count"])} for row in csv.DictReader(handle)}


# --- training --------------------------------------------------------------------------------


def sample_logging_monitor(train_dir: Path, samples_log: Path, **kwargs):
    """A MemorisationMonitor that also writes every sample's best training image and class, so
    that the Duplicate share can be split by the duplication count of the image copied."""
    from deepssim.io.load import ImageSet
    from deepssim.labels import Label
    from deepssim.monitor import MemorisationMonitor

    keys = ImageSet.coerce(train_dir, kwargs.get("options")).keys

    class Monitor(MemorisationMonitor):
        def check(self, step, images):  # MemorisationMonitor.check, also logging each sample's match
            record = super().check(step, images)
            matches = self.last_matches
            new = not samples_log.is_file()
            with open(samples_log, "a", newline="") as handle:
                writer = csv.writer(handle)
                if new:
                    writer.writerow(["step", "sample", "train_key", "ssim_registered", "class"])
                rows = zip(matches.nearest, matches.best, matches.classes, strict=True)
                for n, (i, score, c) in enumerate(rows):
                    writer.writerow([step, n, keys[i], f"{score:.4f}", Label(int(c)).title])
            return record

    return Monitor(train_dir, **kwargs)


def train_model(work: Path, name: str, train_dir: Path, unique_dir: Path, args) -> Path:
    """Autoencoder on the unique images (each once), then the diffusion model on ``train_dir``
    (the repeats) with the monitor; resumes either."""
    from deepssim import LoadOptions
    from deepssim.experiments.ldm import RunInfo, train_diffusion, train_vae
    from deepssim.io.load import ImageSet

    run = work / name
    options = LoadOptions(size=SIZE, fit="resize")
    unique_keys = ImageSet.coerce(unique_dir, options).keys
    train_keys = ImageSet.coerce(train_dir, options).keys
    steps_per_epoch = -(-len(train_keys) // args.batch_size)
    diffusion_epochs = max(1, round(args.diffusion_steps / steps_per_epoch))
    vae_epochs = max(1, round(args.vae_steps / -(-len(unique_keys) // 16)))
    marker = run / "vae_done.json"
    if not marker.is_file():
        log(f"{name}: autoencoder, {vae_epochs} epochs of {len(unique_keys)} unique images")
        train_vae(
            unique_dir,
            run,
            "small",
            "none",
            seed=args.seed,
            vae_epochs=vae_epochs,
            diffusion_epochs=diffusion_epochs,
            diffusion_batch_size=args.batch_size,
            latent_channels=args.latent_channels,
        )
        info = RunInfo.load(run)
        marker.write_text(json.dumps({"scale_factor": info.scale_factor, "unique_keys": info.keys}))
        # the diffusion model trains on the folder with the repeats: the run now lists its files
        info.keys, info.repeats = train_keys, [1] * len(train_keys)
        info.save(run)
    log(
        f"{name}: diffusion, {diffusion_epochs} epochs x {steps_per_epoch} steps "
        f"(batch {args.batch_size}) on {len(train_keys)} files"
    )
    monitor = run_monitor(run, unique_dir, steps_per_epoch, options, args)
    train_diffusion(train_dir, run, monitor=monitor)
    (run / "diffusion_done.json").write_text(json.dumps({"epochs": diffusion_epochs}))
    return run


def train_dedup_model(work: Path, args) -> Path:
    """The diffusion model of ``train_model`` again, on the files ``deepssim dedup`` kept, with the
    first run's autoencoder (it trained on the unique images, each once, so it is the same
    either way) and the same number of optimisation steps; returns its run folder."""
    from deepssim import LoadOptions
    from deepssim.experiments.ldm import LDMConfig, RunInfo, train_diffusion
    from deepssim.io.load import ImageSet

    kept_file = work / "dedup" / "kept.txt"
    if not kept_file.is_file():
        raise SystemExit(f"{kept_file} is missing: run the dedup stage first")
    train_dir, run = work / "data" / "train_dedup", work / "run_dedup"
    train_dir.mkdir(parents=True, exist_ok=True)
    run.mkdir(exist_ok=True)
    for key in kept_file.read_text().split():  # keys: file names without the extension
        target = train_dir / f"{key}.png"
        if not target.exists():
            target.symlink_to((work / "data" / "train" / f"{key}.png").resolve())
    options = LoadOptions(size=SIZE, fit="resize")
    keys = ImageSet.coerce(train_dir, options).keys
    steps_per_epoch = -(-len(keys) // args.batch_size)
    epochs = max(1, round(args.diffusion_steps / steps_per_epoch))
    if not (run / "run.json").is_file():
        first = RunInfo.load(work / "run")
        config = LDMConfig(**{**asdict(first.config), "diffusion_epochs": epochs})
        shutil.copyfile(work / "run" / "vae.safetensors", run / "vae.safetensors")
        RunInfo(
            config, seed=first.seed, keys=keys, repeats=[1] * len(keys), scale_factor=first.scale_factor
        ).save(run)
    log(f"dedup model: diffusion, {epochs} epochs x {steps_per_epoch} steps on {len(keys)} kept files")
    monitor = run_monitor(run, work / "data" / "unique", steps_per_epoch, options, args)
    if not (run / "diffusion_done.json").is_file():
        train_diffusion(train_dir, run, monitor=monitor)
        (run / "diffusion_done.json").write_text(json.dumps({"epochs": epochs}))
    return run


def run_monitor(run: Path, unique_dir: Path, steps_per_epoch: int, options, args):
    """The run's memorisation monitor against the unique images, logging every sample's match; on a
    resumed run the log rows of unsaved epochs are dropped first (they come again)."""
    from deepssim.experiments.ldm import RunInfo

    if (run / "unet_state.pt").is_file():
        _truncate_monitor_logs(run, RunInfo.load(run), steps_per_epoch)
    return sample_logging_monitor(
        unique_dir,
        run / "monitor_samples.csv",
        every=args.monitor_every,
        samples=args.monitor_samples,
        group_by=SUBJECT,
        log=run / "memorisation.csv",
        options=options,
    )


def _truncate_monitor_logs(run: Path, info, steps_per_epoch: int) -> None:
    import torch

    state = torch.load(run / "unet_state.pt", map_location="cpu", weights_only=True)
    last = state["epoch"] * steps_per_epoch
    for name in ("memorisation.csv", "monitor_samples.csv"):
        path = run / name
        if not path.is_file():
            continue
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
        kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= last]
        with open(path, "w", newline="") as handle:
            csv.writer(handle).writerows(kept)


def generate_images(work: Path, name: str, args) -> Path:
    """``args.generated`` images by DDIM (the configuration's 50 steps), unconditioned, as 16-bit
    PNGs like ``deepssim ldm generate`` writes; resumes batch by batch."""
    import torch

    from deepssim.experiments.ldm import RunInfo, _load_weights, make_unet, make_vae, sample
    from deepssim.seeds import derived_seed

    run, out = work / name, work / f"generated_{name}"
    if (out / "manifest.json").is_file():
        return out
    log(f"{name}: generating {args.generated} images")
    out.mkdir(parents=True, exist_ok=True)
    info = RunInfo.load(run)
    vae, unet = make_vae(info.config), make_unet(info.config, None)
    _load_weights(vae, run / "vae.safetensors", "train-vae")
    _load_weights(unet, run / "unet.safetensors", "train-diffusion")
    vae.eval()
    unet.eval()
    batch = 64
    for number, start in enumerate(range(0, args.generated, batch)):
        paths = [out / f"gen_{i:06d}.png" for i in range(start, min(args.generated, start + batch))]
        if all(p.is_file() for p in paths):
            continue
        generator = torch.Generator().manual_seed(derived_seed(args.seed, 3, number))
        images = sample(vae, unet, info, len(paths), generator)
        for path, image in zip(paths, images, strict=True):
            temporary = path.with_suffix(".partial")
            Image.fromarray(np.round(image * 65535).astype(np.uint16)).save(temporary, format="PNG")
            temporary.rename(path)
    settings = {
        "run": str(run),
        "images": args.generated,
        "sampler": "DDIM",
        "steps": info.config.sampling_steps,
    }
    (out / "manifest.json").write_text(json.dumps(settings, indent=1))
    return out


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="build/dose")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--subject-seed",
        type=int,
        default=26,
        help="seed of the pseudo-subjects; not 0, whose subjects the default DeepSSIM model trained on",
    )
    parser.add_argument(
        "--subjects", type=int, default=170, help="pseudo-subjects trained on (6 slices each)"
    )
    parser.add_argument("--control-subjects", type=int, default=40, help="pseudo-subjects never trained on")
    parser.add_argument("--real-every", type=int, default=12, help="every n-th slice of the real volumes")
    parser.add_argument("--doses", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--per-dose", type=int, default=20)
    parser.add_argument("--vae-steps", type=int, default=2070)
    parser.add_argument("--latent-channels", type=int, default=8, help="the small config has 3")
    parser.add_argument("--diffusion-steps", type=int, default=5610)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--monitor-every", type=int, default=800)
    parser.add_argument("--monitor-samples", type=int, default=64)
    parser.add_argument("--generated", type=int, default=2000)
    parser.add_argument("--dar-epochs", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--figures", default="docs", help="where the report's PNGs go")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from deepssim.hardware import cpu_description

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    log(f"CPU: {cpu_description()}; torch threads {torch.get_num_threads()}")
    counts = build_data(work, args)
    data = work / "data"
    log(
        f"{sum(1 for c in counts.values() if c['role'] == 'train')} unique training images, "
        f"{sum(c['count'] for c in counts.values())} training files, "
        f"{sum(1 for c in counts.values() if c['role'] == 'control')} control images"
    )
    if "train" in args.stages:
        started = time.time()
        train_model(work, "run", data / "train", data / "unique", args)
        log(f"training done in {(time.time() - started) / 60:.1f} min")
    if "generate" in args.stages:
        generate_images(work, "run", args)
    if "dedup-model" in args.stages:
        started = time.time()
        train_dedup_model(work, args)
        log(f"dedup model trained in {(time.time() - started) / 60:.1f} min")
        generate_images(work, "run_dedup", args)
    later = [s for s in args.stages if s in ("scan", "audit", "dedup", "dedup-model", "report")]
    if later:
        from dose_analysis import run_stages  # the analysis half, next to this file

        run_stages(work, counts, args, later)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
