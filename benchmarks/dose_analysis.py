"""The analysis half of ``ldm_dose_response.py``: scans, the retrieval audit, deduplication of the
training files, and the report (results.json, figures, Markdown tables). Run through that script."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
from ldm_dose_response import SIZE, SUBJECT, log

CLASSES = ("Different", "Similar", "Duplicate")  # by Label code: DIFFERENT 0, SIMILAR 1, DUPLICATE 2


def _options():
    from deepssim import LoadOptions

    return LoadOptions(size=SIZE, fit="resize")


def reference_folders(work: Path) -> list[Path]:
    """What every scan compares against: the unique training images and the never-seen controls."""
    return [work / "data" / "unique", work / "data" / "control"]


def prefix(run: str) -> str:
    """File name prefix of a run's analysis files: none for the first model, ``run_dedup_`` etc."""
    return "" if run == "run" else f"{run}_"


def run_scans(work: Path, args, run: str = "run") -> dict:
    """DeepSSIM two-stage (the default decision), plain SSIM, and Dar et al. (if trained, first
    model only) of ``generated_RUN``; each saved as ``[PREFIX]scan_NAME/`` and ``.npz`` (reused)."""
    from deepssim import scan
    from deepssim.labels import Label

    generated = work / f"generated_{run}"
    settings = {
        "deepssim": {"metric": "deepssim"},
        "ssim": {"metric": "ssim", "decision": "score"},
    }
    if args.dar_epochs > 0 and run == "run":
        from deepssim.training.dar import DarSettings, train_dar

        dar = work / "dar" / "dar.safetensors"
        if not dar.is_file():
            log(f"training Dar et al. ({args.dar_epochs} epochs) on the unique training images")
            train_dar(work / "data" / "unique", work / "dar", DarSettings(epochs=args.dar_epochs), _options())
        settings["dar"] = {"metric": f"dar={dar}", "decision": "score", "duplicate_fpr": 0.05}
    out = {}
    for name, extra in settings.items():
        path = work / f"{prefix(run)}scan_{name}.npz"
        if not path.is_file():
            log(f"scan: {name} of generated_{run}")
            started = time.time()
            result = scan(
                reference_folders(work),
                generated,
                cache=False,
                options=_options(),
                group_by=SUBJECT,
                **extra,
            )
            result.save(work / f"{prefix(run)}scan_{name}", report=name == "deepssim", gallery_size=12)
            np.savez(
                path,
                neighbours=result.neighbours,
                classes=result.classes,
                decision=np.nan_to_num(result.decision_scores, nan=-1.0),
                registered=np.nan_to_num(result.evidence.ssim_registered, nan=-1.0),
                train_keys=np.array(result.train_keys),
                generated_keys=np.array(result.generated_keys),
                thresholds=np.array([result.thresholds.low, result.thresholds.high]),
                seconds=time.time() - started,
            )
            log(
                f"scan {name}: {int((result.classes == Label.DUPLICATE).sum())} Duplicates of "
                f"{len(result.classes)} in {time.time() - started:.0f} s"
            )
        loaded = np.load(path)
        out[name] = {key: loaded[key] for key in loaded.files}
    return out


def copies_by_count(found: dict, counts: dict, seed: int = 0) -> dict:
    """Per duplication count: training images, share with at least one Duplicate (Wilson 95%),
    Duplicates per training image (bootstrap 95% over images), Duplicates per view."""
    from deepssim.labels import Label
    from deepssim.scanning.decide import share

    keys = [str(k) for k in found["train_keys"]]
    copied = np.bincount(found["neighbours"][found["classes"] == Label.DUPLICATE, 0], minlength=len(keys))
    dose = np.array([counts[k]["count"] for k in keys])
    best = np.full(len(keys), -1.0)  # each training image's best decision score over the generated images
    np.maximum.at(best, found["neighbours"].ravel(), found["decision"].ravel())
    rng = np.random.default_rng(seed)
    table = {}
    for c in sorted(set(dose.tolist())):
        rows = copied[dose == c]
        boot = [rng.choice(rows, len(rows)).mean() for _ in range(2000)]
        table[str(c)] = {
            "training_images": int(len(rows)),
            "with_a_duplicate": share(int((rows > 0).sum()), len(rows)),
            "duplicates_per_image": float(rows.mean()),
            "duplicates_per_image_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            "duplicates": int(rows.sum()),
            "best_score_median": float(np.median(best[dose == c])),
        }
    generated = len(found["classes"])
    total = share(int((found["classes"] == Label.DUPLICATE).sum()), generated)
    return {"by_count": table, "generated": generated, "duplicates": total}


def subjects_leaked(found: dict, counts: dict) -> dict:
    from deepssim.labels import Label
    from deepssim.scanning.decide import share

    keys = [str(k) for k in found["train_keys"]]
    hit = {keys[i] for i in found["neighbours"][found["classes"] == Label.DUPLICATE, 0]}
    out = {}
    for role in ("train", "control"):
        subjects = {c["subject"] for c in counts.values() if c["role"] == role}
        leaked = {counts[k]["subject"] for k in hit if counts[k]["role"] == role}
        out[role] = share(len(leaked), len(subjects)) | {"subjects": len(subjects)}
    return out


def scan_thresholds(found: dict):
    """The registered-SSIM thresholds the DeepSSIM scan decided with (the default for 64x64)."""
    from deepssim.scanning.decide import REGISTERED_SSIM, Thresholds

    low, high = (float(v) for v in found["thresholds"])
    return Thresholds(low, high, "the scan's", score=REGISTERED_SSIM)


def audit(work: Path, found: dict, counts: dict, run: str = "run") -> dict:
    """Brute force: exact SSIM of every generated image (as it is and in each of the four flips,
    which are exact transforms) against every reference image; the scan's best pair against the
    brute-force best pair; the brute-force best pair's registered SSIM, decided as the scan decides
    (the scan's thresholds)."""
    from deepssim import load_images
    from deepssim.scanning.decide import classify
    from deepssim.ssim.engine import ssim_matrix
    from deepssim.ssim.registered import register_pairs

    cached = work / f"{prefix(run)}audit.npz"
    train_keys, train = load_images(reference_folders(work), _options())
    gen_keys, generated = load_images(work / f"generated_{run}", _options())
    assert list(train_keys) == [str(k) for k in found["train_keys"]]
    assert list(gen_keys) == [str(k) for k in found["generated_keys"]]
    if not cached.is_file():
        log(f"audit: exact SSIM of {len(generated)} x {len(train)} pairs, each generated image in 4 flips")
        started = time.time()
        flips = [generated, generated[:, ::-1], generated[:, :, ::-1], generated[:, ::-1, ::-1]]
        matrix = np.max([ssim_matrix(train, np.ascontiguousarray(f)) for f in flips], axis=0)  # (N, M)
        seconds = time.time() - started
        best = matrix.argmax(axis=0)
        plain_best = matrix.max(axis=0)
        unflipped = ssim_matrix(train, generated).max(axis=0)
        registered = register_pairs(train[best].astype(np.float64), generated.astype(np.float64))
        np.savez(
            cached,
            best=best,
            plain_best=plain_best,
            unflipped_best=unflipped,
            registered_best=registered.ssim_registered,
            seconds=seconds,
            top5=np.argsort(-matrix, axis=0)[:5].T,
        )
    a = np.load(cached)
    thresholds = scan_thresholds(found)
    scan_top1 = found["neighbours"][:, 0]
    hit1 = scan_top1 == a["best"]
    hit5 = np.array([b in row for b, row in zip(a["best"], found["neighbours"], strict=True)])
    recall1, recall5 = float(hit1.mean()), float(hit5.mean())
    # the brute-force pair decided as the scan decides (registered SSIM), and the best of the two
    brute_class = classify(a["registered_best"], thresholds)
    scan_class = found["classes"]
    crosstab = {
        f"scan {CLASSES[s]}": {
            f"brute {CLASSES[b]}": int(np.sum((scan_class == s) & (brute_class == b))) for b in (0, 1, 2)
        }
        for s in (0, 1, 2)
    }
    disagree = np.flatnonzero(scan_class != brute_class)
    examples = [
        {
            "generated": str(gen_keys[i]),
            "scan": f"{CLASSES[scan_class[i]]} {found['train_keys'][scan_top1[i]]} "
            f"{found['decision'][i, 0]:.3f}",
            "brute": f"{CLASSES[brute_class[i]]} {train_keys[a['best'][i]]} plain {a['plain_best'][i]:.3f} "
            f"registered {a['registered_best'][i]:.3f}",
        }
        for i in disagree[:10]
    ]
    return {
        "pairs": int(len(train) * len(generated)),
        "ssim_matrix_seconds": float(a["seconds"]),
        "recall_at_1": recall1,
        "recall_at_5": recall5,
        "recall_where_brute_force_pair_is_duplicate": {
            "images": int((brute_class == 2).sum()),
            "at_1": float(hit1[brute_class == 2].mean()) if (brute_class == 2).any() else None,
            "at_5": float(hit5[brute_class == 2].mean()) if (brute_class == 2).any() else None,
        },
        "recall_where_brute_force_pair_is_not_different": {
            "images": int((brute_class != 0).sum()),
            "at_1": float(hit1[brute_class != 0].mean()) if (brute_class != 0).any() else None,
            "at_5": float(hit5[brute_class != 0].mean()) if (brute_class != 0).any() else None,
        },
        "class_crosstab": crosstab,
        "disagreements": int(len(disagree)),
        "disagreement_examples": examples,
        "thresholds": [thresholds.low, thresholds.high],
        "plain_ssim_duplicates_brute_force": int((a["unflipped_best"] > thresholds.high).sum()),
        "flip_max_ssim_duplicates_brute_force": int((a["plain_best"] > thresholds.high).sum()),
    }


def brute_force_found(work: Path, found: dict, run: str = "run") -> dict:
    """The audit's decision in the form of a scan's: each generated image's brute-force best
    training image (exact SSIM over every pair, in four flips) decided by its registered SSIM."""
    from deepssim.scanning.decide import classify

    a = np.load(work / f"{prefix(run)}audit.npz")
    return {
        "train_keys": found["train_keys"],
        "generated_keys": found["generated_keys"],
        "neighbours": a["best"][:, None],
        "decision": a["registered_best"][:, None],
        "thresholds": found["thresholds"],
        "classes": classify(a["registered_best"], scan_thresholds(found)),
    }


def release_check(work: Path, found: dict, run: str = "run") -> dict:
    """The release filter as a user runs it (a fresh DeepSSIM scan, then ``write_release``), with
    and without its exact check, dropping Duplicates or Duplicates and Similar: how many images it
    releases, and how many of those the audit's brute force calls a Duplicate (registered SSIM of
    the best pair over every pair and flip) or a plain-SSIM Duplicate."""
    from deepssim import scan
    from deepssim.scanning.release import write_release

    a = np.load(work / f"{prefix(run)}audit.npz")
    high = scan_thresholds(found).high
    result = scan(reference_folders(work), work / f"generated_{run}", cache=False, options=_options())
    keys = [str(k) for k in found["generated_keys"]]
    assert keys == result.generated_keys
    rows = {}
    for check in ("none", "exact"):
        for drop in (("Duplicate",), ("Duplicate", "Similar")):
            folder = work / f"{prefix(run)}release_{check}_{'+'.join(drop)}"
            shutil.rmtree(folder, ignore_errors=True)
            summary = write_release(result, folder, drop=drop, check=check)
            with open(folder / "release.csv", newline="") as handle:
                released_keys = {r["generated_key"] for r in csv.DictReader(handle) if r["released"] == "yes"}
            released = np.array([k in released_keys for k in keys])
            leaked = released & (a["registered_best"] > high)
            subjects = {str(found["train_keys"][t]).split("_")[0] for t in a["best"][leaked]}
            rows[f"{check} check, drop {'+'.join(drop)}"] = {
                "released": int(released.sum()),
                "generated": len(keys),
                "brute_force_registered_duplicates_released": int(
                    (a["registered_best"][released] > high).sum()
                ),
                "brute_force_flip_max_ssim_duplicates_released": int(
                    (a["plain_best"][released] > high).sum()
                ),
                "brute_force_subjects_leaked": len(subjects),
                "exact_check": summary["exact_check"],
            }
            shutil.rmtree(folder)
            Path(f"{folder}.manifest.csv").unlink(missing_ok=True)
    return rows


def monitor_by_count(run: Path, counts: dict) -> dict:
    """From the monitor's per-sample log: per check, the share of samples that are Duplicates of
    an image of each duplication count."""
    from deepssim.labels import Label

    with open(run / "monitor_samples.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = sorted({int(r["step"]) for r in rows})
    doses = sorted({c["count"] for c in counts.values() if c["role"] == "train"})
    out = {"steps": steps, "by_count": {str(d): [] for d in doses}, "samples": []}
    for step in steps:
        here = [r for r in rows if int(r["step"]) == step]
        out["samples"].append(len(here))
        for d in doses:
            hits = sum(
                1
                for r in here
                if Label.parse(r["class"]) == Label.DUPLICATE and counts[r["train_key"]]["count"] == d
            )
            out["by_count"][str(d)].append(hits / len(here))
    return out


def stop_steps(run: Path) -> dict:
    with open(run / "memorisation.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    out = {}
    for limit in (0.05, 0.1, 0.25):
        reached = [int(r["step"]) for r in rows if float(r["duplicate_share"]) >= limit]
        out[str(limit)] = reached[0] if reached else None
    return out


def vae_ceiling(work: Path, counts: dict) -> dict:
    """The autoencoder's reconstruction of each unique training image: registered SSIM against the
    image. A copy cannot score above what the autoencoder can reproduce."""
    import torch

    from deepssim import load_images
    from deepssim.experiments.ldm import RunInfo, _load_weights, make_vae
    from deepssim.ssim.registered import register_pairs

    info = RunInfo.load(work / "run")
    vae = make_vae(info.config)
    _load_weights(vae, work / "run" / "vae.safetensors", "train-vae")
    vae.eval()
    keys, images = load_images(work / "data" / "unique", _options())
    low = images.min(axis=(1, 2), keepdims=True)
    scaled = (images - low) / (images.max(axis=(1, 2), keepdims=True) - low)
    with torch.no_grad():
        batch = torch.from_numpy(scaled.astype(np.float32)).unsqueeze(1)
        recon = torch.cat([vae.reconstruct(batch[i : i + 64]) for i in range(0, len(batch), 64)])
    recon = recon.clamp(0, 1)[:, 0].numpy().astype(np.float64)
    scores = register_pairs(scaled.astype(np.float64), recon).ssim_registered
    dose = np.array([counts[k]["count"] for k in keys])
    return {
        str(d): {
            "median": float(np.median(scores[dose == d])),
            "share_above_0.85": float(np.mean(scores[dose == d] > 0.85)),
        }
        for d in sorted(set(dose.tolist()))
    }


def dedup_training_files(work: Path, counts: dict) -> dict:
    """deduplicate() on the files the diffusion model trained on: are the planted repeats the
    groups it finds, and does it group distinct images?"""
    from deepssim.scanning.dedup import deduplicate

    out_dir = work / "dedup"
    started = time.time()
    result = deduplicate(work / "data" / "train", out_dir=out_dir, options=_options())
    base = [k.split("__copy")[0] for k in result.keys]
    planted = {k for k, c in counts.items() if c["count"] > 1}
    found_groups = [sorted({base[i] for i in members}) for members in result.groups]
    pure = [g for g in found_groups if len(g) == 1]
    mixed = [g for g in found_groups if len(g) > 1]
    covered = {g[0] for g in pure}
    complete = sum(
        1
        for members in result.groups
        if len({base[i] for i in members}) == 1 and len(members) == counts[base[members[0]]]["count"]
    )
    return {
        "files": len(result.keys),
        "groups": len(result.groups),
        "kept": len(result.kept),
        "planted_repeated_images": len(planted),
        "planted_found_as_a_group": len(covered & planted),
        "groups_holding_all_copies_of_one_image": complete,
        "groups_joining_distinct_images": len(mixed),
        "examples_of_joined_distinct_images": mixed[:5],
        "seconds": round(time.time() - started, 1),
    }


def run_stages(work: Path, counts: dict, args, stages: list[str]) -> None:
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    from deepssim.hardware import cpu_description

    results["cpu"] = cpu_description()
    results["args"] = {k: v for k, v in vars(args).items() if k != "stages"}
    found = run_scans(work, args) if {"scan", "audit", "report"} & set(stages) else {}
    if "scan" in stages:
        results["scores"] = {
            name: copies_by_count(f, counts) | {"subjects_leaked": subjects_leaked(f, counts)}
            for name, f in found.items()
        }
        if (work / "run" / "monitor_samples.csv").is_file():  # the monitor's log of training
            results["monitor_by_count"] = monitor_by_count(work / "run", counts)
            results["monitor_stop_step"] = stop_steps(work / "run")
        results["vae_ceiling"] = vae_ceiling(work, counts)
        results_file.write_text(json.dumps(results, indent=1))
    if "audit" in stages:
        results["audit"] = audit(work, found["deepssim"], counts)
        brute = brute_force_found(work, found["deepssim"])
        results["scores"]["brute force"] = copies_by_count(brute, counts) | {
            "subjects_leaked": subjects_leaked(brute, counts)
        }
        results["release"] = release_check(work, found["deepssim"])
        results_file.write_text(json.dumps(results, indent=1))
    if "dedup" in stages:
        log("dedup of the training files")
        results["dedup"] = dedup_training_files(work, counts)
        results_file.write_text(json.dumps(results, indent=1))
    if "dedup-model" in stages:
        results["dedup_model"] = analyse_model(work, args, counts, "run_dedup")
        results_file.write_text(json.dumps(results, indent=1))
    if "report" in stages:
        figures(work, results, found["deepssim"], counts, Path(args.figures))
        print(markdown(results))


def analyse_model(work: Path, args, counts: dict, run: str) -> dict:
    """A second model's generated images: the scans, the brute-force audit and the release filter,
    as for the first; its monitor curve and stop steps."""
    found = run_scans(work, args, run)
    audited = audit(work, found["deepssim"], counts, run)
    brute = brute_force_found(work, found["deepssim"], run)
    scores = {
        name: copies_by_count(f, counts) | {"subjects_leaked": subjects_leaked(f, counts)}
        for name, f in (*found.items(), ("brute force", brute))
    }
    out = {"scores": scores, "audit": audited, "release": release_check(work, found["deepssim"], run)}
    if (work / run / "monitor_samples.csv").is_file():
        out["monitor_by_count"] = monitor_by_count(work / run, counts)
        out["monitor_stop_step"] = stop_steps(work / run)
    return out


def figures(work: Path, results: dict, found: dict, counts: dict, docs: Path) -> None:
    from matplotlib.figure import Figure

    from deepssim import load_images
    from deepssim.labels import Label

    figure = Figure(figsize=(15, 4))
    left, middle, right = figure.subplots(1, 3)
    doses = [d for d in results["scores"]["deepssim"]["by_count"]]
    x = np.arange(len(doses))
    names = list(results["scores"])
    width = 0.8 / len(names)
    for n, name in enumerate(names):
        table = results["scores"][name]["by_count"]
        values = [table[d]["with_a_duplicate"]["share"] for d in doses]
        lows = [v - table[d]["with_a_duplicate"]["ci95"][0] for v, d in zip(values, doses, strict=True)]
        highs = [table[d]["with_a_duplicate"]["ci95"][1] - v for v, d in zip(values, doses, strict=True)]
        left.bar(
            x + (n - (len(names) - 1) / 2) * width, values, width, yerr=[lows, highs], capsize=3, label=name
        )
        per = [table[d]["duplicates_per_image"] for d in doses]
        plo = [p - table[d]["duplicates_per_image_ci95"][0] for p, d in zip(per, doses, strict=True)]
        phi = [table[d]["duplicates_per_image_ci95"][1] - p for p, d in zip(per, doses, strict=True)]
        middle.errorbar(x, per, yerr=[plo, phi], marker="o", capsize=3, label=name)
    labels = [f"x{d}" + (" (never seen)" if d == "0" else "") for d in doses]
    left.set_xticks(x, labels)
    left.set_xlabel("times the image is in the training set")
    left.set_ylabel("share of its training images with >= 1 Duplicate")
    left.legend()
    middle.set_xticks(x, labels)
    middle.set_yscale("symlog", linthresh=0.1)
    middle.set_xlabel("times the image is in the training set")
    middle.set_ylabel("generated Duplicates per training image")
    middle.legend()
    runs = (("", results), (" (deduplicated)", results.get("dedup_model", {})))
    for suffix, run in runs:
        monitor = run.get("monitor_by_count")
        for d, values in (monitor or {}).get("by_count", {}).items():
            style = "--" if suffix else "-"
            right.plot(monitor["steps"], values, style, marker="o", label=f"x{d}{suffix}")
    right.set_xlabel("diffusion training step")
    right.set_ylabel("monitor samples: Duplicate of an xN image")
    right.legend(title="copied image's count")
    figure.tight_layout()
    docs.mkdir(parents=True, exist_ok=True)
    figure.savefig(docs / "dose_response.png", dpi=100)

    # the most-copied training images beside their copies: the copies the brute force finds (every
    # pair, registered SSIM of the best one) when audited, each marked with the scan's class
    scan_classes = found["classes"]
    if (work / "audit.npz").is_file():
        found = brute_force_found(work, found)
    keys = [str(k) for k in found["train_keys"]]
    duplicate = np.flatnonzero(found["classes"] == Label.DUPLICATE)
    copied = np.bincount(found["neighbours"][duplicate, 0], minlength=len(keys))
    top = [t for t in np.argsort(-copied)[:6] if copied[t] > 0]
    if not top:
        return
    train_keys, train = load_images(reference_folders(work), _options())
    gen_keys, generated = load_images(work / "generated_run", _options())
    columns = max(2, min(5, int(copied[top[0]])))
    figure = Figure(figsize=(2 * (columns + 1), 2.3 * len(top)))
    axes = np.atleast_2d(figure.subplots(len(top), columns + 1))
    for row, t in enumerate(top):
        mine = duplicate[found["neighbours"][duplicate, 0] == t]
        mine = mine[np.argsort(-found["decision"][mine, 0])][:columns]
        axes[row, 0].imshow(train[t], cmap="gray")
        axes[row, 0].set_title(f"training, x{counts[keys[t]]['count']}\n{keys[t][:26]}", fontsize=7)
        for column in range(columns):
            ax = axes[row, column + 1]
            if column < len(mine):
                g = mine[column]
                ax.imshow(generated[g], cmap="gray")
                verdict = "scan: Duplicate" if scan_classes[g] == Label.DUPLICATE else "scan: missed"
                ax.set_title(f"{gen_keys[g]} {found['decision'][g, 0]:.2f}\n{verdict}", fontsize=7)
        for ax in axes[row]:
            ax.axis("off")
    figure.tight_layout()
    figure.savefig(docs / "dose_most_copied.png", dpi=90)


def _fmt(entry: dict) -> str:
    return f"{entry['share']:.1%} [{entry['ci95'][0]:.1%}, {entry['ci95'][1]:.1%}] ({entry['count']})"


def markdown(results: dict, privacy: bool = True) -> str:
    lines = [
        "| score | count | training images | with >= 1 Duplicate [95% CI] (n) "
        "| Duplicates per image [95% CI] | median best score |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["scores"].items():
        for d, t in r["by_count"].items():
            lo, hi = t["duplicates_per_image_ci95"]
            lines.append(
                f"| {name} | x{d} | {t['training_images']} | {_fmt(t['with_a_duplicate'])} | "
                f"{t['duplicates_per_image']:.2f} [{lo:.2f}, {hi:.2f}] | {_median(t)} |"
            )
    lines += [
        "",
        "| score | generated Duplicates | training subjects leaked | never-seen subjects hit |",
        "|---|---|---|---|",
    ]
    for name, r in results["scores"].items():
        s = r["subjects_leaked"]
        lines.append(
            f"| {name} | {_fmt(r['duplicates'])} | {s['train']['count']} of {s['train']['subjects']} | "
            f"{s['control']['count']} of {s['control']['subjects']} |"
        )
    if "dedup_model" in results:
        lines += ["", "The model trained on the deduplicated files:", ""]
        lines += markdown({"scores": results["dedup_model"]["scores"]}, privacy=False).splitlines()
    if privacy:
        lines += ["", *privacy_table(results)]
    return "\n".join(lines)


def privacy_table(results: dict) -> list[str]:
    """What each measure costs and what it prevents: the brute force's copies (registered SSIM of
    every generated image's best pair over every pair and flip) that reach the shared set."""
    brute = results["scores"]["brute force"]
    lines = [
        "| measure | costs | copies that reach the shared set (brute force) | training subjects leaked |",
        "|---|---|---|---|",
        f"| none | - | {brute['duplicates']['count']} of {brute['generated']} | "
        f"{brute['subjects_leaked']['train']['count']} |",
    ]
    for name, row in results.get("release", {}).items():
        lost = row["generated"] - row["released"]
        lines.append(
            f"| release filter ({name}) | {lost} of {row['generated']} samples withheld | "
            f"{row['brute_force_registered_duplicates_released']} | {row['brute_force_subjects_leaked']} |"
        )
    if "dedup" in results:
        d = results["dedup"]
        removed = d["files"] - d["kept"]
        cost = f"{removed} of {d['files']} training files removed ({d['seconds']} s)"
        if "dedup_model" in results:
            b = results["dedup_model"]["scores"]["brute force"]
            lines.append(
                f"| deduplicate, then train | {cost} | {b['duplicates']['count']} of {b['generated']} | "
                f"{b['subjects_leaked']['train']['count']} |"
            )
    for run, r in (("first model", results), ("deduplicated model", results.get("dedup_model", {}))):
        stops = r.get("monitor_stop_step")
        if stops:
            said = ", ".join(f"share {k}: {'step ' + str(v) if v else 'never'}" for k, v in stops.items())
            lines.append(f"| monitor stop ({run}) | steps after the stop | stops at: {said} | - |")
    return lines


def _median(table: dict) -> str:
    """The median best score, or n/a where most images are no generated image's best pair (the
    brute force keeps only each generated image's best pair)."""
    return "n/a" if table["best_score_median"] < -0.5 else f"{table['best_score_median']:.3f}"
