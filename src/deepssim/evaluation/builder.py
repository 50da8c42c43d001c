"""Build a labelled memorisation benchmark from real images: a training folder, a generated
folder and a pairs CSV with planted Duplicates, Similar pairs and Different pairs.

Recipe (seeded; every planted image is written as a 16-bit PNG):

1. Source files (volumes, or 2D images) are split into *training subjects* (``train_share``)
   and *other subjects*. The training folder holds a random ``slice_share`` of the training
   subjects' images (at most ``max_training_images``); their other slices stay out, to serve
   as neighbouring slices.
2. **Duplicate** (label 1): a training image with mild generative-style degradation (blur,
   noise, gamma; ``deepssim.pairs.degrade`` at up to ``copy_strength`` of the strength used for
   training pairs), paired with that training image.
3. **Similar** (label 2): anatomically close but not a copy of the paired training image, in
   three kinds: a slice of the same volume 2-6 slices away that is not itself in the training
   folder (else a deformation is planted instead); a smooth random deformation
   (displacement up to a few pixels) plus degradation; a blend with another training image
   (weight 0.5-0.7 on the paired one).
4. **Different** (label 0): an image of an other subject, paired half the time with a random
   training image and half the time with its most SSIM-similar training image (hard negatives).
5. Pairs are split at random, half ``calib`` and half ``test`` (for ``evaluate --calib-split``).
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.io.files import atomic_path, write_text_atomic
from deepssim.io.load import ImageSet, LoadOptions
from deepssim.io.normalise import zscore
from deepssim.labels import Label
from deepssim.settings import option
from deepssim.ssim.engine import ssim_matrix
from deepssim.training.pairs import deform, degrade

NEIGHBOUR_OFFSETS = (2, 3, 4, 5, 6)


@dataclass
class BenchmarkSettings:
    duplicates: int = field(default=60, metadata=option("planted Duplicates"))
    similar: int = field(default=60, metadata=option("planted Similar images"))
    different: int = field(default=60, metadata=option("planted Different images"))
    train_share: float = field(default=0.6, metadata=option("share of subjects in training"))
    slice_share: float = field(default=0.7, metadata=option("share of a training subject's slices kept"))
    max_training_images: int = field(default=400, metadata=option("at most this many training images"))
    deformation_pixels: float = 3.0
    copy_strength: float = field(default=0.3, metadata=option("degradation of planted copies (0-1)"))
    seed: int = field(default=0, metadata=option("seed of every random draw"))

    def __post_init__(self) -> None:
        for flag, value in (
            ("--duplicates", self.duplicates),
            ("--similar", self.similar),
            ("--different", self.different),
        ):
            if value < 0:
                raise DeepSSIMError(f"{flag} must be 0 or more, not {value}")
        if self.max_training_images < 1:
            raise DeepSSIMError(f"--max-training-images must be at least 1, not {self.max_training_images}")
        for flag, value in (("--train-share", self.train_share), ("--slice-share", self.slice_share)):
            if not 0 < value <= 1:
                raise DeepSSIMError(f"{flag} is a share, in (0, 1], not {value}")


def build_benchmark(
    images,
    out_dir,
    settings: BenchmarkSettings | None = None,
    options: LoadOptions | None = None,
    progress: bool = False,
) -> dict:
    """Write ``train/``, ``generated/``, ``pairs.csv`` and ``benchmark.json``; return the counts."""
    settings = settings or BenchmarkSettings()
    image_set = ImageSet.coerce(images, options, progress)
    groups = [str(ref.path) for ref in image_set.refs]
    unique = sorted(set(groups))
    if len(unique) < 2:
        raise DeepSSIMError("a benchmark needs images from at least two source files (subjects)")
    rng = np.random.default_rng(settings.seed)
    order = rng.permutation(len(unique))
    n_train = min(max(1, round(settings.train_share * len(unique))), len(unique) - 1)
    training_groups = {unique[i] for i in order[:n_train]}
    pool = zscore(image_set.read())
    train_rows = [
        i for i, g in enumerate(groups) if g in training_groups and rng.random() < settings.slice_share
    ]
    if not train_rows:
        train_rows = [next(i for i, g in enumerate(groups) if g in training_groups)]
    other_rows = [i for i, g in enumerate(groups) if g not in training_groups]
    if len(train_rows) > settings.max_training_images:
        train_rows = sorted(rng.choice(train_rows, settings.max_training_images, replace=False).tolist())
    by_slice = {(groups[i], image_set.refs[i].index): i for i in range(len(groups))}
    train_set_rows = set(train_rows)
    out_dir = Path(out_dir)
    names = _file_names([image_set.keys[i] for i in train_rows])
    train_keys = {
        i: _write_png(out_dir / "train", name, pool[i]) for i, name in zip(train_rows, names, strict=True)
    }
    planted: list[tuple[str, str, int, str]] = []  # (train key, generated key, label, kind)
    count = 0

    def plant(image: np.ndarray, partner: int, label: int, kind: str) -> None:
        nonlocal count
        key = _write_png(out_dir / "generated", f"gen_{count:05d}", image)
        planted.append((train_keys[partner], key, label, kind))
        count += 1

    for _ in range(settings.duplicates):
        source = int(rng.choice(train_rows))
        plant(
            degrade(pool[source], int(rng.integers(2**62)), settings.copy_strength),
            source,
            Label.DUPLICATE,
            "degraded_copy",
        )
    for n in range(settings.similar):
        source = int(rng.choice(train_rows))
        kind = ("neighbour_slice", "deformed", "blend")[n % 3]
        ref = image_set.refs[source]
        neighbour = None
        if kind == "neighbour_slice" and ref.index is not None:
            offsets = [d * sign for d in NEIGHBOUR_OFFSETS for sign in (-1, 1)]
            for offset in rng.permutation(offsets):
                candidate = by_slice.get((groups[source], ref.index + int(offset)))
                if candidate is not None and candidate not in train_set_rows:  # not a training image
                    neighbour = candidate
                    break
        if kind == "neighbour_slice" and neighbour is None:
            kind = "deformed"  # a 2D image or the edge of a volume
        if kind == "neighbour_slice":
            image = pool[neighbour]
        elif kind == "deformed":
            deformed = deform(pool[source], int(rng.integers(2**62)), settings.deformation_pixels)
            image = degrade(deformed, int(rng.integers(2**62)), settings.copy_strength)
        else:
            other = int(rng.choice([i for i in train_rows if i != source] or [source]))
            alpha = rng.uniform(0.5, 0.7)
            image = alpha * pool[source] + (1 - alpha) * pool[other]
        plant(image, source, Label.SIMILAR, kind)
    if other_rows:
        chosen = rng.choice(other_rows, settings.different, replace=len(other_rows) < settings.different)
        train_array = pool[train_rows]
        for n, source in enumerate(chosen):
            if n % 2 == 0:
                partner, kind = int(rng.choice(train_rows)), "other_subject_random"
            else:
                scores = ssim_matrix(train_array, pool[[source]])[:, 0]
                partner, kind = train_rows[int(np.argmax(scores))], "other_subject_nearest"
            plant(pool[source], partner, Label.DIFFERENT, kind)
    splits = np.where(rng.random(len(planted)) < 0.5, "calib", "test")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["train_key", "generated_key", "label", "split", "kind"])
    for (train_key, key, label, kind), split in zip(planted, splits, strict=True):
        writer.writerow([train_key, key, Label(label).title, split, kind])
    write_text_atomic(out_dir / "pairs.csv", buffer.getvalue())
    labels = [p[2] for p in planted]
    summary = {
        "settings": asdict(settings),
        "training_images": len(train_rows),
        "training_subjects": sorted(Path(g).name for g in training_groups),
        "other_subjects": sorted(Path(g).name for g in set(unique) - training_groups),
        "generated_images": len(planted),
        "pairs_by_label": {
            label.title: labels.count(label) for label in (Label.DIFFERENT, Label.DUPLICATE, Label.SIMILAR)
        },
    }
    write_text_atomic(out_dir / "benchmark.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _file_names(keys: list[str]) -> list[str]:
    """A flat file name per key ('/' and '#' become '_'); keys that would share one name get a
    short hash of the key appended, so no file overwrites another."""
    import hashlib

    flat = [key.replace("/", "_").replace("#", "_") for key in keys]
    counts = Counter(flat)
    return [
        f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}" if counts[name] > 1 else name
        for name, key in zip(flat, keys, strict=True)
    ]


def _write_png(folder: Path, name: str, image: np.ndarray) -> str:
    """Save as a 16-bit PNG (min-max scaled) as ``folder/name.png``; return the name (its key)."""
    from PIL import Image

    path = folder / f"{name}.png"
    scaled = (image - image.min()) / max(np.ptp(image), 1e-12)
    with atomic_path(path, suffix=".png") as temporary:
        Image.fromarray(np.round(scaled * 65535).astype(np.uint16)).save(temporary, format="PNG")
    return name
