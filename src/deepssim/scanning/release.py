"""A privacy filter for release: the generated images that pass a scan, in a folder ready to share.

Privacy Distillation (Fernandez et al., 2023) filters re-identifiable samples out before a
synthetic set is released; the DeepSSIM paper names this as its next step. The filter drops
every generated image the scan called Duplicate (and, optionally, Similar). Files are copied,
never moved, with their paths below the generated folder. A file holding several images (a
NIfTI volume, a multi-frame DICOM) is released only if none of its images is dropped. The folder
is written under a temporary name and renamed when complete, so it is complete or absent.
``release.csv`` lists every generated image, kept or dropped and why; ``release.json`` the
thresholds, the model's hash and the counts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from deepssim.errors import DeepSSIMError
from deepssim.io.files import write_rows_atomic, write_text_atomic
from deepssim.labels import Label


def write_release(result, folder: str | Path, *, drop: tuple[str, ...] = ("Duplicate",)) -> dict:
    """Copy the generated images of ``result`` (a ScanResult) whose class is not in ``drop`` into
    ``folder``; return the release's summary (also written as ``release.json``)."""
    folder = Path(folder)
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
            reason = f"{name} of {result.train_keys[result.neighbours[i, 0]]}"
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
    summary = {
        "dropped_classes": list(drop),
        "thresholds": {
            "low": result.thresholds.low,
            "high": result.thresholds.high,
            "source": result.thresholds.source,
        },
        "decision": (result.summary.audit or {}).get("settings", {}).get("decision"),
        "model": (result.summary.audit or {}).get("model", {}),
        "generated_images": len(rows),
        "released_images": sum(r["released"] == "yes" for r in rows),
        "released_files": len(copies),
        "scan_date_utc": (result.summary.audit or {}).get("date_utc"),
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
    try:
        for source, target in copies.items():
            (partial / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, partial / target)
        write_rows_atomic(partial / "release.csv", rows)
        write_text_atomic(partial / "release.json", json.dumps(summary, indent=2) + "\n")
        os.rename(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return summary
