"""A privacy filter for release: the generated images that pass a scan, in a folder ready to share.

Privacy Distillation (Fernandez et al., 2023) filters re-identifiable samples out before a
synthetic set is released; the DeepSSIM paper names this as its next step. The filter drops
every generated image the scan called Duplicate (and, optionally, Similar). Files are copied,
never moved, with their paths below the generated folder. A file holding several images (a
NIfTI volume, a multi-frame DICOM) is released only if none of its images is dropped. The folder
is written under a temporary name and renamed when complete, so it is complete or absent.

The exact check (on by default): a scan registers only the k training images its retriever
ranks first, and a copy the retriever ranks lower (the case study's copies with a generator's
edge artefact were ranked 55th-344th) would be released. So before release every image that would
be released is compared by exact SSIM with every training image, as it is and in its three flips;
its best ``check_k`` training images are registered and decided by registered SSIM, and an image
that turns out a dropped class is dropped too (``reason`` says so). The thresholds are the scan's
when it decided by registered SSIM, else registered SSIM's defaults for the image size.

The release folder names no training image: its ``release.csv`` lists every generated image
with its class and whether it was released, ``release.json`` the thresholds, the model's hash
and the counts. The manifest that names each generated image's nearest training image (and
the score) is written outside it: beside it as ``FOLDER.manifest.csv`` by default, or where
``manifest`` says (``deepssim scan --release-dir`` puts it in the scan's ``--out`` folder as
``release.csv``).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.io.files import atomic_folder, write_rows_atomic, write_text_atomic
from deepssim.labels import Label

PUBLIC_COLUMNS = ["generated_key", "class", "released", "file", "reason"]
CHECKS = ("exact", "none")


def default_manifest(folder: str | Path) -> Path:
    """Where the manifest that names training images goes by default: beside the release folder."""
    folder = Path(folder)
    return folder.parent / f"{folder.name}.manifest.csv"


def exact_check(result, rows, drop: tuple[str, ...], k: int = 5, progress: bool = False) -> dict:
    """The release's exact check of the generated images ``rows`` (indices into ``result``): for
    each found to be of a class in ``drop``, row -> (class name, training index, registered SSIM);
    with the check's thresholds and timing under ``"summary"``."""
    from deepssim.scanning.decide import REGISTERED_SSIM, classify, default_thresholds
    from deepssim.scanning.registration import register_top_k
    from deepssim.scanning.retrieve import exact_top_k

    started = time.perf_counter()
    rows = np.asarray(rows, dtype=np.int64)
    thresholds = result.thresholds
    if thresholds.score != REGISTERED_SSIM:
        thresholds = default_thresholds(REGISTERED_SSIM, result.train.shape, None)
    summary = {
        "images_checked": int(len(rows)),
        "training_images_per_image": int(min(k, len(result.train))),
        "thresholds": {"low": thresholds.low, "high": thresholds.high, "score": thresholds.score},
    }
    found = {}
    if len(rows):
        generated = result.generated.subset(rows)
        _, nearest = exact_top_k(result.train, generated, k, progress=progress)
        selected = np.ones(nearest.shape, dtype=bool)
        if result.decision == "two-stage":  # pairs the scan registered already decided its class
            selected = ~(nearest[:, :, None] == result.neighbours[rows][:, None, :]).any(axis=2)
        evidence = register_top_k(result.train, generated, nearest, selected, progress=progress)
        scores = np.where(selected, np.nan_to_num(evidence.ssim_registered, nan=-np.inf), -np.inf)
        best = scores.argmax(axis=1)
        best_scores = scores[np.arange(len(rows)), best]
        for n, code in enumerate(classify(best_scores, thresholds)):
            name = Label(int(code)).title
            if name in drop:
                found[int(rows[n])] = (name, int(nearest[n, best[n]]), float(best_scores[n]))
    summary["images_dropped"] = len(found)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return {"summary": summary, "found": found}


def write_release(
    result,
    folder: str | Path,
    *,
    drop: tuple[str, ...] = ("Duplicate",),
    manifest: str | Path | None = None,
    check: str = "exact",
    check_k: int = 5,
    progress: bool = False,
) -> dict:
    """Copy the generated images of ``result`` (a ScanResult) whose class is not in ``drop`` into
    ``folder``; return the release's summary (also written as ``release.json``). ``manifest``:
    where the full manifest (with each image's nearest training image) goes, outside ``folder``
    (default :func:`default_manifest`). check: "exact" (the module's exact check of every image
    that would be released against every training image; ``check_k`` of them registered) or
    "none" (the scan's classes only)."""
    folder = Path(folder)
    manifest = Path(manifest) if manifest is not None else default_manifest(folder)
    if manifest.resolve().is_relative_to(folder.resolve()):
        raise DeepSSIMError(f"the release manifest {manifest} names training images: put it outside {folder}")
    unknown = set(drop) - {Label.DUPLICATE.title, Label.SIMILAR.title}
    if unknown or "Duplicate" not in drop:
        raise DeepSSIMError(f"a release drops Duplicate and optionally Similar, not {sorted(unknown)}")
    if folder.exists():
        raise DeepSSIMError(f"{folder} already exists; a release goes into a new folder (choose another)")
    if check not in CHECKS:
        raise DeepSSIMError(f"the release check must be one of {', '.join(CHECKS)}, not {check!r}")
    if check_k < 1:
        raise DeepSSIMError(f"the release check needs at least 1 training image per image, not {check_k}")
    refs = result.generated.refs
    names = [Label(int(c)).title for c in result.classes]
    nearest = [result.train_keys[i] for i in result.neighbours[:, 0]]
    scores = [f"{s:.6f}" for s in result.decision_scores[:, 0]]
    checked = {"found": {}, "summary": None}
    if check == "exact":
        checked = exact_check(
            result, [i for i, n in enumerate(names) if n not in drop], drop, check_k, progress
        )
    exact_found = set(checked["found"])
    for i, (name, train_index, score) in checked["found"].items():
        names[i], nearest[i], scores[i] = name, result.train_keys[train_index], f"{score:.6f}"
    dropped_files = {ref.path: ref.key for ref, name in zip(refs, names, strict=True) if name in drop}
    rows, copies = [], {}
    for i, (ref, name) in enumerate(zip(refs, names, strict=True)):
        target = Path(ref.key.split("#", 1)[0]).parent / ref.path.name
        if i in exact_found:
            reason = f"dropped: {name} by the exact check (a training image outside the scan's top k)"
        elif name in drop:
            reason = f"dropped: {name}"
        elif ref.path in dropped_files:
            reason = f"its file also holds {dropped_files[ref.path]}, which is dropped"
        else:
            reason = ""
            copies[ref.path] = target
        rows.append(
            {
                "generated_key": ref.key,
                "class": name,
                "score": scores[i],
                "nearest_train_key": nearest[i],
                "released": "no" if reason else "yes",
                "file": target.as_posix() if not reason else "",
                "reason": reason,
            }
        )
    model = dict((result.summary.audit or {}).get("model", {}))
    if "name" in model:  # a checkpoint's path says nothing the fingerprint does not, and may name a person
        model["name"] = Path(str(model["name"])).name
    summary = {
        "dropped_classes": list(drop),
        "thresholds": {
            "low": result.thresholds.low,
            "high": result.thresholds.high,
            "source": result.thresholds.source,
        },
        "decision": (result.summary.audit or {}).get("settings", {}).get("decision"),
        "check": check,
        "exact_check": checked["summary"],
        "model": model,
        "generated_images": len(rows),
        "released_images": sum(r["released"] == "yes" for r in rows),
        "released_files": len(copies),
        "scan_date_utc": (result.summary.audit or {}).get("date_utc"),
    }
    public = [{name: row[name] for name in PUBLIC_COLUMNS} for row in rows]
    try:
        with atomic_folder(folder) as partial:
            for source, target in copies.items():
                (partial / target).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, partial / target)
            write_rows_atomic(partial / "release.csv", public, PUBLIC_COLUMNS)
            write_text_atomic(partial / "release.json", json.dumps(summary, indent=2) + "\n")
            write_rows_atomic(manifest, rows)
    except BaseException:
        if not folder.exists():
            manifest.unlink(missing_ok=True)
        raise
    return summary
