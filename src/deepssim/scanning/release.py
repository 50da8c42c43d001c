"""A privacy filter for release: the generated images that pass a scan, in a folder ready to share.

Privacy Distillation (Fernandez et al., 2023) filters re-identifiable samples out before a
synthetic set is released; the DeepSSIM paper names this as its next step. The filter drops
every generated image the scan called Duplicate (and, optionally, Similar). Files are copied,
never moved, with their paths below the generated folder. A file holding several images (a
NIfTI volume, a multi-frame DICOM) is released only if none of its images is dropped. The folder
is written under a temporary name and renamed when complete, so it is complete or absent.

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
from pathlib import Path

from deepssim.errors import DeepSSIMError
from deepssim.io.files import atomic_folder, write_rows_atomic, write_text_atomic
from deepssim.labels import Label

PUBLIC_COLUMNS = ["generated_key", "class", "released", "file", "reason"]


def default_manifest(folder: str | Path) -> Path:
    """Where the manifest that names training images goes by default: beside the release folder."""
    folder = Path(folder)
    return folder.parent / f"{folder.name}.manifest.csv"


def write_release(
    result, folder: str | Path, *, drop: tuple[str, ...] = ("Duplicate",), manifest: str | Path | None = None
) -> dict:
    """Copy the generated images of ``result`` (a ScanResult) whose class is not in ``drop`` into
    ``folder``; return the release's summary (also written as ``release.json``). ``manifest``:
    where the full manifest (with each image's nearest training image) goes, outside ``folder``
    (default :func:`default_manifest`)."""
    folder = Path(folder)
    manifest = Path(manifest) if manifest is not None else default_manifest(folder)
    if manifest.resolve().is_relative_to(folder.resolve()):
        raise DeepSSIMError(f"the release manifest {manifest} names training images: put it outside {folder}")
    unknown = set(drop) - {Label.DUPLICATE.title, Label.SIMILAR.title}
    if unknown or "Duplicate" not in drop:
        raise DeepSSIMError(f"a release drops Duplicate and optionally Similar, not {sorted(unknown)}")
    if folder.exists():
        raise DeepSSIMError(f"{folder} already exists; a release goes into a new folder (choose another)")
    refs = result.generated.refs
    names = [Label(int(c)).title for c in result.classes]
    dropped_files = {ref.path: ref.key for ref, name in zip(refs, names, strict=True) if name in drop}
    rows, copies = [], {}
    for i, (ref, name) in enumerate(zip(refs, names, strict=True)):
        target = Path(ref.key.split("#", 1)[0]).parent / ref.path.name
        if name in drop:
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
                "score": f"{result.decision_scores[i, 0]:.6f}",
                "nearest_train_key": result.train_keys[result.neighbours[i, 0]],
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
