"""``report.html``: one self-contained page (every image embedded as a data URI) with the scan's
summary, the histogram of best scores with the thresholds (and the reference distribution),
and a gallery of the most similar pairs side by side with a difference map.

Every key and file name is HTML-escaped. Anonymised (``anonymise=True``), the page holds no
image of anyone and no absolute path: the gallery shows, for Duplicates only, an 8 x 8 grid of the
mean absolute difference; the audit trail names each input folder by its name only. ``name``
(e.g. :func:`deepssim.scanning.audit.key_hasher`) then replaces every key and patient ID shown.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from html import escape
from pathlib import PurePath

import numpy as np

from deepssim.io.display import colour, png_bytes, to_uint8
from deepssim.io.files import write_text_atomic
from deepssim.labels import Label
from deepssim.scanning.audit import WITHHELD, anonymised_audit
from deepssim.scanning.evidence import GalleryPair
from deepssim.scanning.summary import ScanSummary

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; }
td, th { padding: 4px 10px; border-bottom: 1px solid #eee; text-align: left; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.Duplicate { color: #fff; background: #c0392b; } .Similar { background: #f5c242; }
.Different { background: #d5e8d4; }
.badge { padding: 1px 8px; border-radius: 8px; }
.pair { display: inline-block; margin: 8px; padding: 8px; border: 1px solid #ddd; border-radius: 6px; }
.pair img { width: 160px; height: auto; image-rendering: pixelated; margin-right: 4px; }
.pair figcaption { font-size: 0.85em; max-width: 500px; word-break: break-all; }
"""


# an anonymised block map: this many pixels a side, on a fixed scale of mean |z difference|
BLOCK_MAP_PIXELS = 128
BLOCK_MAP_RANGE = (0.0, 1.5)


def write_report(
    result,
    path,
    gallery: list[GalleryPair],
    anonymise: bool = False,
    name: Callable[[str], str] | None = None,
) -> None:
    """Write the report of a :class:`deepssim.scanning.scan.ScanResult` atomically."""
    write_text_atomic(path, render_report(result, gallery, anonymise, name))


def render_report(
    result, gallery: list[GalleryPair], anonymise: bool = False, name: Callable[[str], str] | None = None
) -> str:
    """The page, from the scan's result and its gallery evidence (:mod:`deepssim.scanning.evidence`);
    nothing is computed here but pictures of what was. ``name``: how a key or patient ID is shown
    (default as it is)."""
    summary = result.summary
    thresholds = result.thresholds
    name = name or str
    model = PurePath(result.model).name if anonymise else result.model
    # with hashed keys, a --group-by regex (which may spell patient IDs) is withheld too
    by = (summary.groups or {}).get("by")
    withhold = (by,) if name is not str and by not in (None, "volume", "folder") else ()
    if anonymise:
        hashed = " Keys and patient IDs are shown as salted hashes." if name is not str else ""
        gallery_text = (
            "<p id='anonymised'><strong>Anonymised report: no image of any patient is included.</strong> "
            "Each Duplicate shows only an 8 x 8 grid of the mean absolute difference between the z-scored "
            "training image and the aligned generated image (white = no difference, dark red = a "
            "difference of 1.5 standard deviations or more); other pairs show their scores only. No path "
            f"on this machine is named.{hashed}</p>"
        )
    else:
        gallery_text = (
            "<p>Generated image; its nearest training image; the generated image moved by the rigid "
            "transform that aligns it best, with the regions that lower the DeepSSIM score in red "
            "(integrated gradients of the cosine from the training image); the training image with its "
            "local SSIM against the aligned image (red = dissimilar).</p>"
        )
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>DeepSSIM memorisation report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>DeepSSIM memorisation report</h1>",
        "<p>"
        + escape(
            f"{summary.generated_images} generated images scanned against {summary.training_images} "
            f"training images with {result.metric} ({model}); decision: {summary.decision}; "
            f"thresholds low {thresholds.low:.4g}, high {thresholds.high:.4g} ({thresholds.source}); "
            f"top-{summary.k} matches kept."
        )
        + "</p>",
        "<h2 id='summary'>Summary</h2>",
        _summary_table(summary),
        _patients(result, name, withhold),
        "<h2 id='histogram'>Best score of each generated image</h2>",
        f"<img id='histogram-image' alt='histogram of best scores' src='{_histogram_png(result)}'>",
        "<h2 id='gallery'>Most similar pairs</h2>",
        gallery_text,
        _gallery(result, gallery, anonymise, name),
        "<h2 id='audit'>Audit trail</h2>",
        _audit(anonymised_audit(summary.audit, withhold) if anonymise else summary.audit),
        "</body></html>",
    ]
    return "\n".join(parts)


def _summary_table(summary: ScanSummary) -> str:
    rows = [
        "<table id='summary-table'><tr><th>Class</th><th class='num'>Generated images</th>"
        "<th class='num'>Share</th><th class='num'>95% CI</th></tr>"
    ]
    for name, entry in summary.generated_by_class.items():
        low, high = entry["ci95"]
        rows.append(
            f"<tr><td><span class='badge {name}'>{name}</span></td><td class='num'>{entry['count']}</td>"
            f"<td class='num'>{entry['share']:.1%}</td><td class='num'>{low:.1%} - {high:.1%}</td></tr>"
        )
    memorised = summary.training_images_with_a_duplicate
    low, high = memorised["ci95"]
    rows.append(
        f"<tr><td>Training images with at least one Duplicate</td><td class='num'>{summary.at_least}"
        f"{memorised['count']} of {summary.training_images}</td><td class='num'>{memorised['share']:.1%}</td>"
        f"<td class='num'>{low:.1%} - {high:.1%}</td></tr></table>"
    )
    if summary.copy_counts:
        rows.append(
            f"<p id='copy-counts'>Counts of copied training images and patients are "
            f"{escape(summary.copy_counts)}.</p>"
        )
    percentiles = summary.best_score_percentiles
    rows.append(
        "<p>Best score percentiles: "
        + escape(", ".join(f"{name} {value:.3f}" for name, value in percentiles.items()))
        + "</p>"
    )
    if summary.reference is not None:
        reference = summary.reference
        threshold = summary.reference_threshold()
        rows.append(
            f"<p>Reference: each of the {reference['training_images']} training images' best score against "
            f"held-out real images of other patients; 95th percentile = {threshold:.4f} "
            "(Dar et al.'s Duplicate threshold).</p>"
        )
    return "\n".join(rows)


def _png(figure_or_array) -> str:
    if isinstance(figure_or_array, np.ndarray):
        data = png_bytes(figure_or_array)
    else:
        buffer = io.BytesIO()
        figure_or_array.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        data = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _histogram_png(result) -> str:
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is

    best = result.decision_scores[:, 0]
    values = [best] + ([result.reference_scores] if result.reference_scores is not None else [])
    low_edge = min(float(np.min(v)) for v in values)
    bins = np.linspace(min(low_edge, result.thresholds.low) - 0.02, 1.0, 51)
    figure = Figure(figsize=(9, 3.6))
    axes = figure.subplots()
    axes.hist(
        best, bins=bins, color="#4a7ab5", alpha=0.8, label=f"generated images, best match ({len(best)})"
    )
    if result.reference_scores is not None:
        axes.hist(
            result.reference_scores,
            bins=bins,
            histtype="step",
            linewidth=2,
            color="#333",
            label=f"training vs held-out real images ({len(result.reference_scores)})",
        )
    axes.axvline(
        result.thresholds.low, color="#e67e22", linestyle="--", label=f"low {result.thresholds.low:.3g}"
    )
    axes.axvline(
        result.thresholds.high, color="#c0392b", linestyle="--", label=f"high {result.thresholds.high:.3g}"
    )
    what = "registered SSIM" if result.decision == "two-stage" else f"{result.metric} score"
    axes.set_xlabel(f"best {what} against the training set")
    axes.set_ylabel("images")
    axes.legend(loc="upper left", fontsize=8)
    encoded = _png(figure)
    return encoded


def _gallery(result, gallery: list[GalleryPair], anonymise: bool, name: Callable[[str], str] = str) -> str:
    if not gallery:
        return "<p>No generated images.</p>"
    items = []
    for rank, pair in enumerate(gallery, 1):
        i = pair.generated_index
        title = Label(int(result.classes[i])).title
        generated_key = escape(name(result.generated_keys[i]))
        train_key = escape(name(result.train_keys[pair.train_index]))
        if anonymise:
            images = [
                _img(f"{label} map", _block_map(values, colormap)) for label, values, colormap in pair.maps
            ]
        else:
            images = [
                _img(f"generated {generated_key}", to_uint8(pair.generated)),
                _img(f"training {train_key}", to_uint8(pair.train)),
            ]
            overlays = {label: values for label, values, _ in pair.maps}
            if "similarity lost" in overlays:
                images.append(
                    _img(
                        "aligned generated, similarity lost",
                        _overlay(pair.aligned, overlays["similarity lost"]),
                    )
                )
            else:
                images.append(_img("aligned generated", to_uint8(pair.aligned)))
            if "local SSIM" in overlays:
                # 1 - local SSIM on an absolute scale: a copy shows (almost) no red
                images.append(
                    _img("training, local SSIM", _overlay(pair.train, 1 - overlays["local SSIM"], 1.0))
                )
        score = f"{result.metric} {result.scores[i, 0]:.4f}"
        evidence = result.evidence
        if evidence is not None and evidence.has(i, 0):
            score += (
                f", registered SSIM {evidence.ssim_registered[i, 0]:.4f} ({evidence.transform_text(i, 0)}), "
                f"plain SSIM {evidence.ssim_plain[i, 0]:.4f}"
            )
        if result.best_other_scores is not None and np.isfinite(result.best_other_scores[i]):
            other = "patient" if result.groups is not None else "training image"
            score += f"; best other {other}: {result.best_other_scores[i]:.4f}"
        items.append(
            f"<figure class='pair'>{''.join(images)}<figcaption>#{rank} "
            f"<span class='badge {title}'>{title}</span> {escape(score)}<br>generated: {generated_key}"
            f"<br>training: {train_key}</figcaption></figure>"
        )
    return "<div id='gallery-items'>" + "\n".join(items) + "</div>"


def _block_map(values: np.ndarray, colormap: str) -> np.ndarray:
    """A coarse map drawn blocky: each value a square of pixels, on the fixed block-map scale."""
    side = max(1, BLOCK_MAP_PIXELS // max(values.shape))
    blocky = np.kron(values, np.ones((side, side)))
    return colour(blocky, colormap, BLOCK_MAP_RANGE)


def _img(alt: str, pixels: np.ndarray) -> str:
    return f"<img alt='{escape(alt)}' src='{_png(pixels)}'>"


def _overlay(image: np.ndarray, heat: np.ndarray, full_scale: float | None = None) -> np.ndarray:
    """The gray image with ``heat`` blended in red: scaled to ``full_scale``, or to its own 99th
    percentile when None (an attribution map has no natural unit)."""
    gray = to_uint8(image).astype(np.float64)[..., None].repeat(3, axis=2)
    scale = full_scale if full_scale is not None else max(np.percentile(heat, 99), 1e-12)
    weight = np.clip(heat / scale, 0, 1)[..., None]
    red = np.array([230.0, 30.0, 30.0])
    return np.clip(gray * (1 - 0.7 * weight) + red * 0.7 * weight, 0, 255).astype(np.uint8)


def _patients(result, name: Callable[[str], str] = str, withhold: tuple[str, ...] = ()) -> str:
    """The patient table: training groups, most-copied first (only with --group-by)."""
    if result.groups is None:
        return ""
    by = result.summary.groups["by"]
    by = WITHHELD if by in withhold else by
    entry = result.summary.groups["with_a_duplicate"]
    low, high = entry["ci95"]
    rows = "".join(
        f"<tr><td>{escape(name(row['group']))}</td><td class='num'>{row['training_images']}</td>"
        f"<td class='num'>{row['images_with_a_duplicate']}</td></tr>"
        for row in result.groups[:200]
    )
    return (
        f"<h2 id='patients'>Patients</h2><p>{result.summary.at_least}"
        f"{entry['count']} of {len(result.groups)} training groups "
        f"({escape(by)}) have at least one image with a Duplicate: "
        f"{entry['share']:.1%} (95% CI {low:.1%} - {high:.1%}).</p>"
        "<table id='patient-table'><tr><th>Group</th><th class='num'>Training images</th>"
        f"<th class='num'>Images with a Duplicate</th></tr>{rows}</table>"
    )


def _audit(audit: dict | None) -> str:
    if not audit:
        return "<p>No audit trail recorded.</p>"
    rows = [
        ("tool", audit["tool"]),
        ("date (UTC)", audit["date_utc"]),
        ("command line", audit["command_line"]),
        ("model", f"{audit['model']['metric']}: {audit['model']['name']}"),
        ("model fingerprint (SHA-256)", audit["model"]["fingerprint_sha256"]),
    ]
    thresholds = audit["settings"]["thresholds"]
    rows.append(
        ("thresholds", f"low {thresholds['low']:.4g}, high {thresholds['high']:.4g} ({thresholds['source']})")
    )
    for role, entry in audit["inputs"].items():
        rows.append(
            (
                f"{role} images",
                f"{', '.join(entry['given'])}: {entry['files']} files, {entry['images']} images "
                f"({entry['skipped_images']} skipped), content SHA-256 {entry['content_sha256']}",
            )
        )
    rows.append(
        ("settings", ", ".join(f"{k}={v}" for k, v in audit["settings"].items() if k != "thresholds"))
    )
    cells = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table id='audit-table'>{cells}</table>"
