"""``report.html``: one self-contained page (every image embedded as a data URI) with the scan's
summary, the histogram of best scores with the thresholds (and the reference distribution),
and a gallery of the most similar pairs side by side with a difference map.

Every key and file name is HTML-escaped.
"""

from __future__ import annotations

import base64
import io
from html import escape

import numpy as np

from deepssim.io.files import write_text_atomic
from deepssim.scanning.decide import CLASS_NAMES, classify

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


def write_report(result, path, gallery_size: int = 24) -> None:
    """Write the report of a :class:`deepssim.scan.ScanResult` atomically."""
    write_text_atomic(path, render_report(result, gallery_size))


def render_report(result, gallery_size: int = 24) -> str:
    summary = result.summary
    thresholds = result.thresholds
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>DeepSSIM memorisation report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>DeepSSIM memorisation report</h1>",
        "<p>"
        + escape(
            f"{summary['generated_images']} generated images scanned against {summary['training_images']} "
            f"training images with {result.metric} ({result.model}); thresholds low {thresholds.low:.4g}, "
            f"high {thresholds.high:.4g} ({thresholds.source}); top-{summary['k']} matches kept."
        )
        + "</p>",
        "<h2 id='summary'>Summary</h2>",
        _summary_table(summary),
        "<h2 id='histogram'>Best score of each generated image</h2>",
        f"<img id='histogram-image' alt='histogram of best scores' src='{_histogram_png(result)}'>",
        "<h2 id='gallery'>Most similar pairs</h2>",
        "<p>Generated image, its nearest training image, and the absolute difference of the "
        "z-scored images (brighter = more different; misaligned copies show edges).</p>",
        _gallery(result, gallery_size),
        "</body></html>",
    ]
    return "\n".join(parts)


def _summary_table(summary: dict) -> str:
    rows = [
        "<table id='summary-table'><tr><th>Class</th><th class='num'>Generated images</th>"
        "<th class='num'>Share</th><th class='num'>95% CI</th></tr>"
    ]
    for name, entry in summary["generated_by_class"].items():
        low, high = entry["ci95"]
        rows.append(
            f"<tr><td><span class='badge {name}'>{name}</span></td><td class='num'>{entry['count']}</td>"
            f"<td class='num'>{entry['share']:.1%}</td><td class='num'>{low:.1%} - {high:.1%}</td></tr>"
        )
    memorised = summary["training_images_with_a_duplicate"]
    low, high = memorised["ci95"]
    rows.append(
        f"<tr><td>Training images with at least one Duplicate</td><td class='num'>{memorised['count']}"
        f" of {summary['training_images']}</td><td class='num'>{memorised['share']:.1%}</td>"
        f"<td class='num'>{low:.1%} - {high:.1%}</td></tr></table>"
    )
    percentiles = summary["best_score_percentiles"]
    rows.append(
        "<p>Best score percentiles: "
        + escape(", ".join(f"{name} {value:.3f}" for name, value in percentiles.items()))
        + "</p>"
    )
    if "reference" in summary:
        reference = summary["reference"]
        threshold = next(v for k, v in reference.items() if k.endswith("_threshold"))
        rows.append(
            f"<p>Reference: each of the {reference['training_images']} training images' best score against "
            f"held-out real images of other patients; 95th percentile = {threshold:.4f} "
            "(Dar et al.'s Duplicate threshold).</p>"
        )
    return "\n".join(rows)


def _png(figure_or_array) -> str:
    buffer = io.BytesIO()
    if isinstance(figure_or_array, np.ndarray):
        from PIL import Image

        Image.fromarray(figure_or_array).save(buffer, format="PNG")
    else:
        figure_or_array.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _histogram_png(result) -> str:
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is

    best = result.scores[:, 0]
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
    axes.set_xlabel(f"best {result.metric} score against the training set")
    axes.set_ylabel("images")
    axes.legend(loc="upper left", fontsize=8)
    encoded = _png(figure)
    return encoded


def _to_uint8(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, [0.5, 99.5])
    return np.clip((image - low) / max(high - low, 1e-12) * 255, 0, 255).astype(np.uint8)


def _difference(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    if a.shape != b.shape:
        return None
    from matplotlib import colormaps

    za = (a - a.mean()) / a.std()
    zb = (b - b.mean()) / b.std()
    difference = np.abs(za - zb)
    scaled = np.clip(difference / max(np.percentile(difference, 99.5), 1e-12), 0, 1)
    return (colormaps["magma"](scaled)[..., :3] * 255).astype(np.uint8)


def _gallery(result, gallery_size: int) -> str:

    order = np.argsort(-result.scores[:, 0], kind="stable")[:gallery_size]
    if len(order) == 0:
        return "<p>No generated images.</p>"
    generated = result.synthetic.take(order)
    training = result.train.take(result.neighbours[order, 0])
    classes = classify(result.scores[order, 0], result.thresholds)
    items = []
    for rank, (i, fake, real, label) in enumerate(zip(order, generated, training, classes, strict=True), 1):
        name = CLASS_NAMES[int(label)]
        synthetic_key = escape(result.synthetic_keys[i])
        train_key = escape(result.train_keys[result.neighbours[i, 0]])
        difference = _difference(real, fake)
        images = [
            f"<img alt='generated {synthetic_key}' src='{_png(_to_uint8(fake))}'>",
            f"<img alt='training {train_key}' src='{_png(_to_uint8(real))}'>",
        ]
        if difference is not None:
            images.append(f"<img alt='difference' src='{_png(difference)}'>")
        score = f"{result.metric} {result.scores[i, 0]:.4f}"
        if result.verified_ssim is not None:
            score += f", SSIM {result.verified_ssim[i, 0]:.4f}"
        items.append(
            f"<figure class='pair'>{''.join(images)}<figcaption>#{rank} "
            f"<span class='badge {name}'>{name}</span> {escape(score)}<br>generated: {synthetic_key}"
            f"<br>training: {train_key}</figcaption></figure>"
        )
    return "<div id='gallery-items'>" + "\n".join(items) + "</div>"
