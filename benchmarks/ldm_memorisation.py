"""The case study: does memorisation rise with duplication, and does the tool see it?

Trains the small latent diffusion model at the three duplication levels (none, low, high) on a
small training set, the memorisation-prone setting, with the memorisation monitor checking every
``--monitor-every`` steps; then generates ``--per-image`` images per training image and scans
them with DeepSSIM (two-stage: DeepSSIM retrieves, registered SSIM decides), with exact SSIM, and
with the Dar et al. embedding baseline (trained here on the same training images; label-free
threshold at 5% false positives from different volumes). Finally the release filter: the share
of each level's images that pass, and exact SSIM on what passes.

``--equal steps`` (default) gives every level the same number of diffusion optimisation steps
(epochs are set from the duplicated set's size), so levels differ in how often each image is
seen, not in training length. ``--equal epochs --diffusion-epochs E`` is the paper's protocol:
every level trains E epochs of its duplicated set, so more duplication also means more steps
(with 24 images: none 1 step per epoch, low 3, high 7). The autoencoder gets ``--vae-steps``
steps at every level either way.

    .venv/bin/python data/build_training_slices.py build/default-train
    .venv/bin/python benchmarks/ldm_memorisation.py --images 24 --diffusion-steps 3000 --monitor-every 500 \
        --workdir build/ldm24
    .venv/bin/python benchmarks/ldm_memorisation.py --images 24 --equal epochs --diffusion-epochs 1000 \
        --monitor-every 500 --workdir build/ldm24-epochs

Writes ``results.json``, ``memorisation_by_step.csv``, ``case_study.png`` (Duplicate share by
level with 95% intervals, and against training steps) and ``most_copied.png`` (the most-copied
training images beside their closest generated copies) into the work folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from deepssim import LoadOptions, load_images, scan
from deepssim.experiments.ldm import CONFIGS, RunInfo, generate, repetition_counts, train_diffusion, train_vae
from deepssim.hardware import cpu_description
from deepssim.monitor import MemorisationMonitor
from deepssim.scanning.release import write_release

LEVELS = ("none", "low", "high")
GROUPS = r"^(.*)_axis\d"  # training slices are named STACK_axisN_III: one group per volume


def training_folder(source: Path, out: Path, count: int) -> Path:
    """Write `count` 64x64 PNG slices (axial stacks of the bundled volumes) once."""
    if out.is_dir() and len(list(out.glob("*.png"))) == count:
        return out
    out.mkdir(parents=True, exist_ok=True)
    stacks = sorted(source.glob("*_axis2.npy"))
    slices = [(path.stem, i, image) for path in stacks for i, image in enumerate(np.load(path)) if i % 4 == 0]
    chosen = np.random.default_rng(0).choice(len(slices), size=min(count, len(slices)), replace=False)
    from skimage.transform import resize

    for index in sorted(chosen):
        stem, i, image = slices[index]
        small = resize(image, (64, 64), anti_aliasing=True, preserve_range=True)
        scaled = (small - small.min()) / np.ptp(small)
        Image.fromarray(np.round(scaled * 65535).astype(np.uint16)).save(out / f"{stem}_{i:03d}.png")
    return out


def train_level(train: Path, work: Path, level: str, args) -> Path:
    """Train (or resume, or reuse) one level's autoencoder and diffusion model."""
    run = work / f"run_{level}"
    count = len(load_images(train)[0])
    seen = sum(repetition_counts(count, level, 0))  # images per epoch after duplication
    config = CONFIGS["small"]
    vae_epochs = max(1, round(args.vae_steps / -(-seen // config.vae_batch_size)))
    if args.equal == "epochs":
        diffusion_epochs = args.diffusion_epochs
    else:
        diffusion_epochs = max(1, round(args.diffusion_steps / -(-seen // config.diffusion_batch_size)))
    train_vae(train, run, "small", level, vae_epochs=vae_epochs, diffusion_epochs=diffusion_epochs)
    log = run / "memorisation.csv"
    monitor = MemorisationMonitor(
        train,
        every=args.monitor_every,
        samples=args.monitor_samples,
        group_by=GROUPS,
        log=log,
        options=LoadOptions(size=(64, 64), fit="resize"),
    )
    train_diffusion(train, run, monitor=monitor)
    return run


def scans(train: Path, generated: Path, work: Path, level: str, dar: Path) -> dict:
    """The three scores' results on one level's generated images."""
    options = LoadOptions(size=(64, 64), fit="resize")
    runs = {
        "deepssim": {"metric": "deepssim"},
        "ssim": {"metric": "ssim", "decision": "score"},
        "dar": {"metric": f"dar={dar}", "decision": "score", "duplicate_fpr": 0.05},
    }
    out = {}
    for name, settings in runs.items():
        result = scan(train, generated, cache=False, options=options, group_by=GROUPS, **settings)
        result.save(work / f"scan_{level}_{name}", gallery_size=12, overwrite=True)
        out[name] = result
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="build/default-train")
    parser.add_argument("--workdir", default="build/ldm24")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--per-image", type=int, default=10)
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--equal", choices=("steps", "epochs"), default="steps")
    parser.add_argument("--diffusion-steps", type=int, default=3000, help="per level, with --equal steps")
    parser.add_argument("--diffusion-epochs", type=int, default=1000, help="per level, with --equal epochs")
    parser.add_argument("--monitor-every", type=int, default=1000)
    parser.add_argument("--monitor-samples", type=int, default=24)
    parser.add_argument("--dar-epochs", type=int, default=5)
    args = parser.parse_args()
    work = Path(args.workdir)
    train = training_folder(Path(args.source), work / "train", args.images)
    count = len(load_images(train)[0])
    print(f"CPU: {cpu_description()}")
    budget = (
        f"{args.diffusion_steps} diffusion steps"
        if args.equal == "steps"
        else f"{args.diffusion_epochs} diffusion epochs"
    )
    print(f"{count} training images of 64x64 in {train}; {budget} per level")

    from deepssim.training.dar import DarSettings, train_dar

    dar = work / "dar" / "dar.safetensors"
    if not dar.is_file():
        train_dar(train, work / "dar", DarSettings(epochs=args.dar_epochs), LoadOptions(size=(64, 64)))

    results, by_step, copies = {}, [], []
    for level in LEVELS:
        run = train_level(train, work, level, args)
        with open(run / "memorisation.csv", newline="") as handle:
            by_step += [{"level": level, **row} for row in csv.DictReader(handle)]
        generated = work / f"generated_{level}"
        if not (generated / "manifest.json").is_file():
            generate(run, generated, per_image=args.per_image)
        found = scans(train, generated, work, level, dar)
        release = work / f"release_{level}"
        shutil.rmtree(release, ignore_errors=True)
        survived = write_release(found["deepssim"], release)
        check = (
            scan(train, release, metric="ssim", decision="score", cache=False)
            if survived["released_images"]
            else None
        )
        results[level] = {
            "scores": {
                name: {
                    "by_class": r.summary.generated_by_class,
                    "patients_leaked": r.summary.groups["with_a_duplicate"]["count"],
                    "patients": r.summary.groups["groups"],
                    "training_images_with_a_duplicate": r.summary.training_images_with_a_duplicate["count"],
                }
                for name, r in found.items()
            },
            "release": {
                "released": survived["released_images"],
                "generated": survived["generated_images"],
                "ssim_duplicates_among_released": 0
                if check is None
                else check.summary.generated_by_class["Duplicate"]["count"],
            },
        }
        if level != "none":  # every image is seen once per epoch there: no dose to compare
            results[level]["copies_by_repeats"] = {
                name: _copies_by_repeats(found[name], run) for name in ("deepssim", "ssim")
            }
        copies += _top_copies(found["deepssim"], level)
        print(json.dumps({level: results[level]}), flush=True)

    (work / "results.json").write_text(
        json.dumps({"cpu": cpu_description(), "args": vars(args), "levels": results}, indent=1)
    )
    with open(work / "memorisation_by_step.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(by_step[0]))
        writer.writeheader()
        writer.writerows(by_step)
    _plot(results, by_step, work / "case_study.png")
    _grid(copies, work / "most_copied.png")
    _table(results)


def _copies_by_repeats(result, run: Path) -> dict:
    """Are the images the duplication repeats most the ones the model copies? Per training
    image: its repeats per epoch and the generated images called its Duplicate (their best pair,
    the decided one, is that image); Spearman's rank correlation and the copies per image in
    the upper and lower halves of repeats."""
    from scipy.stats import spearmanr

    recorded = RunInfo.load(run)
    repeats = dict(zip(recorded.keys, recorded.repeats, strict=True))
    copied = np.bincount(result.neighbours[result.classes == 1, 0], minlength=len(result.train))
    seen = np.array([repeats[key] for key in result.train.keys])
    upper = seen > np.median(seen)
    rho, p_value = spearmanr(seen, copied)
    return {
        "repeats": seen.tolist(),
        "duplicates": copied.tolist(),
        "spearman_rho": round(float(rho), 3),
        "p_value": float(p_value),
        "duplicates_per_image_upper_half": round(float(copied[upper].mean()), 2),
        "duplicates_per_image_lower_half": round(float(copied[~upper].mean()), 2),
    }


def _top_copies(result, level: str, count: int = 4) -> list:
    """The ``count`` generated images with the highest registered SSIM, beside their training image."""
    scores = np.nan_to_num(result.decision_scores[:, 0], nan=-np.inf)
    order = np.argsort(-scores)[:count]
    train = result.train.take(result.neighbours[order, 0])
    generated = result.generated.take(order)
    return [(level, float(scores[i]), t, g) for i, t, g in zip(order, train, generated, strict=True)]


def _plot(results: dict, by_step: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 4))
    left, right, dose = figure.subplots(1, 3)
    width = 0.25
    for n, name in enumerate(("deepssim", "ssim", "dar")):
        shares, low, high = [], [], []
        for level in LEVELS:
            entry = results[level]["scores"][name]["by_class"]["Duplicate"]
            shares.append(entry["share"])
            low.append(entry["share"] - entry["ci95"][0])
            high.append(entry["ci95"][1] - entry["share"])
        x = np.arange(len(LEVELS)) + (n - 1) * width
        left.bar(x, shares, width, yerr=[low, high], capsize=3, label=name)
    left.set_xticks(np.arange(len(LEVELS)), LEVELS)
    left.set_xlabel("duplication level")
    left.set_ylabel("share of generated images called Duplicate")
    left.legend()
    for level in LEVELS:
        rows = [r for r in by_step if r["level"] == level]
        right.plot(
            [int(r["step"]) for r in rows],
            [float(r["duplicate_share"]) for r in rows],
            marker="o",
            label=level,
        )
    right.set_xlabel("diffusion training step")
    right.set_ylabel("Duplicate share of the monitor's samples")
    right.legend(title="duplication")
    jitter = np.random.default_rng(0)
    for level in LEVELS[1:]:
        d = results[level]["copies_by_repeats"]["deepssim"]
        x = np.array(d["repeats"]) + jitter.uniform(-0.15, 0.15, len(d["repeats"]))
        dose.scatter(x, d["duplicates"], label=f"{level} (rho {d['spearman_rho']:.2f})", alpha=0.7)
    dose.set_xlabel("times the training image is seen per epoch")
    dose.set_ylabel("generated images called its Duplicate (DeepSSIM)")
    dose.legend(title="duplication")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _grid(copies: list, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2 * len(copies) // 2 + 1, 4.4))
    axes = figure.subplots(2, len(copies))
    for column, (level, score, train, generated) in enumerate(copies):
        for row, (image, label) in enumerate(((train, "training"), (generated, f"{level} {score:.2f}"))):
            axes[row, column].imshow(image, cmap="gray")
            axes[row, column].set_title(label, fontsize=7)
            axes[row, column].axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _table(results: dict) -> None:
    print(
        "\n| duplication | score | Duplicate [95% CI] | Similar | patients leaked | training images copied |"
    )
    print("|---|---|---|---|---|---|")
    for level, entry in results.items():
        for name, r in entry["scores"].items():
            d, s = r["by_class"]["Duplicate"], r["by_class"]["Similar"]
            interval = f"{d['share']:.1%} [{d['ci95'][0]:.1%}, {d['ci95'][1]:.1%}]"
            print(
                f"| {level} | {name} | {interval} | {s['share']:.1%} | "
                f"{r['patients_leaked']} of {r['patients']} | {r['training_images_with_a_duplicate']} |"
            )
    print(
        "\n| duplication | score | Spearman rho (repeats, Duplicates per image) | p "
        "| Duplicates per image, upper / lower half of repeats |"
    )
    print("|---|---|---|---|---|")
    for level, entry in results.items():
        for name, d in entry.get("copies_by_repeats", {}).items():
            print(
                f"| {level} | {name} | {d['spearman_rho']:.2f} | {d['p_value']:.2g} | "
                f"{d['duplicates_per_image_upper_half']} / {d['duplicates_per_image_lower_half']} |"
            )
    print("\n| duplication | released (DeepSSIM filter) | SSIM Duplicates among released |")
    print("|---|---|---|")
    for level, entry in results.items():
        rel = entry["release"]
        print(
            f"| {level} | {rel['released']} of {rel['generated']} | {rel['ssim_duplicates_among_released']} |"
        )


if __name__ == "__main__":
    main()
