"""Siamese training: the cosine of two augmented views' embeddings regresses the clean SSIM.

One run writes into its output folder:

- ``pairs.npz``: the pair table with SSIM targets (reused when images and settings match);
- ``last.safetensors/.json`` and ``resume.pt`` after every epoch (``resume.pt``: weights,
  optimiser, schedule and log, tensors and plain values only, loaded with ``weights_only=True``);
- ``best.safetensors/.json``: the epoch with the lowest validation MSE (the mean of the aligned
  and the misaligned MSE);
- ``log.csv``: one row per epoch.

Every random draw of a step (batch order, augmentation, dropout) is seeded from (seed, epoch,
step), so a run resumed after an interruption ends with the same weights as one that was not.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from deepssim.embedding.model import DeepSSIM, make_config
from deepssim.embedding.networks import ARCHITECTURES, EMBEDDING_DIM, build_network, load_imagenet_weights
from deepssim.errors import DeepSSIMError
from deepssim.hardware import PRECISIONS, resolve_precision
from deepssim.io.files import atomic_path, write_rows_atomic
from deepssim.io.load import ImageSet, LoadOptions
from deepssim.io.normalise import zscore
from deepssim.progress import progress_bar
from deepssim.seeds import derived_seed
from deepssim.settings import option
from deepssim.training.augment import (
    AUGMENTATION_FAMILIES,
    AUGMENTATION_SETS,
    augment_batch,
    check_augmentation,
)
from deepssim.training.pairs import (
    KIND_SHARES,
    PairTable,
    degrade,
    fingerprint,
    kind_shares,
    pairs_from_csv,
    sample_pairs,
    second_images,
)
from deepssim.training.synthetic import CONTRAST_MODES

WARMUP_SHARE = 0.05
MAX_RANKING_OFFSET = 3  # the retrieval loss's hard negatives: slices 1-3 away in the same stack
RANKING_LOSSES = ("margin", "infonce")
RANKING_COPY_STRENGTH = 0.5  # degradation of the retrieval loss's queries (the protocol's copies: 0.3)
SYNTHETIC_SIZE = (128, 128)  # pseudo-subject slices when no training images set the size
LOG_COLUMNS = [
    "epoch",
    "train_mse",
    "val_aligned_mse",
    "val_aligned_mae",
    "val_aligned_pearson",
    "val_misaligned_mse",
    "val_misaligned_mae",
    "val_misaligned_pearson",
    "learning_rate",
    "seconds",
]


@dataclass
class TrainSettings:
    """Training hyper-parameters. Defaults: the fast CPU model; the paper's v1 values
    (lr 1e-3, weight decay 1e-3, clipping 1.0) apply to every architecture.

    layer_decay: each layer group from the output down gets this factor more decay of its
    learning rate (1.0 = none; the authors' later variant uses 0.3).
    initial_weights: a DeepSSIM checkpoint (or "default") to fine-tune instead of starting from
    scratch; its architecture replaces ``architecture``, and the log's epoch 0 is the start model
    on the same validation pairs (best_epoch 0: training did not improve on it).
    """

    architecture: str = field(
        default="deepssim_fast", metadata=option("network", choices=ARCHITECTURES.names)
    )
    epochs: int = field(default=20, metadata=option("training epochs"))
    batch_size: int = field(default=64, metadata=option("pairs per batch"))
    learning_rate: float = field(default=1e-3, metadata=option("AdamW learning rate", flag="--lr"))
    weight_decay: float = field(default=1e-3, metadata=option("AdamW weight decay"))
    grad_clip: float = field(default=1.0, metadata=option("gradient norm clipping"))
    layer_decay: float = field(default=1.0, metadata=option("layer-wise lr decay (1 = off)"))
    precision: str = field(
        default="auto",
        metadata=option("auto: bfloat16 only where the hardware computes it natively", choices=PRECISIONS),
    )
    augmentation: str = field(
        default="rigid",
        metadata=option(
            "augmentation of the two views: a set (" + ", ".join(AUGMENTATION_SETS.names()) + ") or "
            "families joined with + (" + "+".join(AUGMENTATION_FAMILIES.names()) + ")"
        ),
    )
    ranking_weight: float = field(
        default=0.0,
        metadata=option(
            "weight of the retrieval loss beside the SSIM regression (a degraded, augmented copy "
            "must pick its own image among the batch's images and their neighbouring slices)"
        ),
    )
    ranking_loss: str = field(
        default="margin",
        metadata=option(
            "margin: the copy's cosine with its own image must beat its best other by --ranking-margin "
            "(leaves the SSIM scale alone); infonce: softmax over the gallery (pushes every other down)",
            choices=RANKING_LOSSES,
        ),
    )
    ranking_margin: float = field(default=0.05, metadata=option("cosine margin of the margin retrieval loss"))
    ranking_temperature: float = field(
        default=0.05, metadata=option("temperature of the infonce retrieval loss")
    )
    pair_kinds: str = field(
        default="all",
        metadata=option(
            "kinds of self-supervised pairs, comma-separated (" + ",".join(KIND_SHARES) + "), or all"
        ),
    )
    synthetic_contrast: str = field(
        default="random",
        metadata=option(
            "pseudo-subjects' tissue contrast: random (T1/T2/PD/FLAIR-like or random) or t1 (T1-like only)",
            choices=CONTRAST_MODES,
        ),
    )
    n_pairs: int = field(default=20000, metadata=option("self-supervised pairs to sample"))
    val_fraction: float = field(default=0.2, metadata=option("share of images held out for validation"))
    seed: int = field(default=0, metadata=option("seed of every random draw"))
    synthetic_subjects: int = field(
        default=0, metadata=option("add N domain-randomised pseudo-subjects made from the MNI152 tissue maps")
    )
    slices_per_subject: int = field(default=24, metadata=option("slices taken from each pseudo-subject"))
    initial_weights: str | None = field(
        default=None,
        metadata=option("fine-tune this checkpoint (or 'default') instead of starting from scratch"),
    )
    pretrained: str | None = field(
        default=None, metadata=option("start from ImageNet backbone weights", choices=("imagenet",))
    )
    pretrained_file: str | None = field(
        default=None, metadata=option("the ImageNet weights file (default: torch.hub cache)")
    )
    device: str = field(default="cpu", metadata=option("cpu or cuda"))

    def check(self) -> None:
        resolve_precision(self.precision, self.device)
        check_augmentation(self.augmentation)  # an unknown name is an error that lists the choices
        kind_shares(self.pair_kinds)
        if self.synthetic_contrast not in CONTRAST_MODES:
            raise DeepSSIMError(f"synthetic_contrast must be one of {', '.join(CONTRAST_MODES)}")
        if self.ranking_weight < 0 or not self.ranking_temperature > 0 or not 0 <= self.ranking_margin < 2:
            raise DeepSSIMError(
                "ranking_weight must be >= 0, ranking_temperature > 0 and ranking_margin in [0, 2)"
            )
        if self.ranking_loss not in RANKING_LOSSES:
            raise DeepSSIMError(f"ranking_loss must be one of {', '.join(RANKING_LOSSES)}")
        if self.pretrained not in (None, "imagenet"):
            raise DeepSSIMError("pretrained must be 'imagenet' or absent")
        if self.synthetic_subjects < 0 or self.slices_per_subject < 1:
            raise DeepSSIMError("synthetic subjects must be >= 0 and slices per subject >= 1")
        if self.epochs < 1 or self.batch_size < 1 or self.n_pairs < 2:
            raise DeepSSIMError("epochs, batch size and number of pairs must be positive")
        if not 0 <= self.val_fraction < 1:
            raise DeepSSIMError("val_fraction must be in [0, 1)")


@dataclass
class TrainingResult:
    best_checkpoint: Path
    last_checkpoint: Path
    log: list[dict]
    summary: dict


def train(
    images,
    out_dir: str | Path,
    settings: TrainSettings | None = None,
    generated=None,
    pairs_csv: str | Path | None = None,
    options: LoadOptions | None = None,
    progress: bool = False,
    resume: bool = True,
) -> TrainingResult:
    """Train a DeepSSIM embedder on training images (and optionally generated images).

    images, generated: folders, files or :class:`ImageSet`s. Without ``pairs_csv`` pairs are
    sampled self-supervised (:func:`deepssim.pairs.sample_pairs`); with it, the listed
    (train_key, generated_key) pairs are used, train keys from ``images``, generated from ``generated``.
    resume: continue from ``out_dir/resume.pt`` when it exists.
    """
    requested = settings or TrainSettings()
    requested.check()
    # "auto" becomes this machine's precision; the run's identity (for resume) keeps "auto"
    settings = replace(requested, precision=resolve_precision(requested.precision, requested.device))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    pool, table, neighbours = _pairs(images, generated, pairs_csv, options, settings, out_dir, progress)
    image_count = len(pool)
    train_pairs, val_pairs = table.of_split("train"), table.of_split("val")
    if len(train_pairs) == 0 or len(val_pairs) == 0:
        raise DeepSSIMError(
            "training needs pairs on both sides of the train/validation split; add images "
            "(at least two source files) or set a split column in the pairs file"
        )
    device = torch.device(settings.device)
    if settings.initial_weights is not None:
        start = DeepSSIM.load(settings.initial_weights)
        if isinstance(start.network, torch.jit.ScriptModule):
            raise DeepSSIMError(f"{settings.initial_weights}: a TorchScript model cannot be fine-tuned")
        settings = replace(settings, architecture=start.config["architecture"])
        network = start.network
    else:
        network = build_network(settings.architecture)
    if settings.pretrained == "imagenet":
        load_imagenet_weights(network, settings.architecture, settings.pretrained_file)
    network = network.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        _parameter_groups(network, settings), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    steps_per_epoch = math.ceil(len(train_pairs) / settings.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(steps_per_epoch * settings.epochs)
    )
    # where the run executes is not part of its identity: it may resume on another device
    settings_json = json.dumps(
        {k: v for k, v in asdict(requested).items() if k not in ("device", "pretrained_file")}, sort_keys=True
    )
    start_epoch, best_score, log = 0, math.inf, []
    state_path = out_dir / "resume.pt"
    if resume and state_path.exists():
        start_epoch, best_score, log = _restore(state_path, network, optimizer, scheduler, settings_json)
    config = make_config(settings.architecture, network.input_channels, EMBEDDING_DIM)
    model = DeepSSIM(network, config, settings.device)
    if settings.initial_weights is not None and not log:  # epoch 0: the start model itself
        row = {"epoch": 0, "train_mse": float("nan"), **_validation(network, pool, val_pairs, settings)}
        row.update(learning_rate=0.0, seconds=0.0)
        log.append(row)
        best_score = (row["val_aligned_mse"] + row["val_misaligned_mse"]) / 2
        summary = _summary(settings, log, image_count, train_pairs, val_pairs)
        model.save(out_dir / "best", training=summary)
    for epoch in range(start_epoch, settings.epochs):
        started = time.perf_counter()
        train_mse = _train_epoch(
            network, optimizer, scheduler, pool, neighbours, train_pairs, settings, epoch, progress
        )
        row = {"epoch": epoch + 1, "train_mse": train_mse, **_validation(network, pool, val_pairs, settings)}
        row["learning_rate"] = scheduler.get_last_lr()[-1]
        row["seconds"] = time.perf_counter() - started
        log.append(row)
        score = (row["val_aligned_mse"] + row["val_misaligned_mse"]) / 2
        if not math.isfinite(score) or not math.isfinite(train_mse):
            raise DeepSSIMError(
                f"training diverged in epoch {epoch + 1} (loss is not finite); lower --lr or use "
                "--precision float32, and rerun with --restart"
            )
        summary = _summary(settings, log, image_count, train_pairs, val_pairs)
        if score < best_score:
            best_score = score
            summary["best_epoch"] = epoch + 1
            model.save(out_dir / "best", training=summary)
        model.save(out_dir / "last", training=summary)
        _write_log(out_dir / "log.csv", log)
        _save_state(state_path, epoch + 1, best_score, log, network, optimizer, scheduler, settings_json)
        if progress:
            print(
                f"epoch {epoch + 1}/{settings.epochs}: train MSE {train_mse:.4f}, validation MAE "
                f"aligned {row['val_aligned_mae']:.4f}, misaligned {row['val_misaligned_mae']:.4f}"
            )
    best_config = json.loads((out_dir / "best.json").read_text())
    return TrainingResult(
        out_dir / "best.safetensors", out_dir / "last.safetensors", log, best_config["training"]
    )


def prepare_training_data(settings: TrainSettings, out_dir: str | Path, progress: bool = False) -> None:
    """Synthesise the pseudo-subjects and sample the pairs of a synthetic-only run into
    ``out_dir`` (``synthetic.npz``, ``pairs.npz``): runs that share them can link them in."""
    settings.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _pairs(None, None, None, None, settings, out_dir, progress)


def _validation(network, pool, val_pairs, settings) -> dict:
    """MSE, MAE and Pearson on the validation pairs, aligned and misaligned."""
    row = {}
    for setting, augmentation in (("aligned", "none"), ("misaligned", "misaligned")):
        predicted = predict_pairs(network, pool, val_pairs, augmentation, settings)
        row.update(
            {f"val_{setting}_{k}": v for k, v in regression_metrics(predicted, val_pairs.ssim).items()}
        )
    return row


def _pairs(images, generated, pairs_csv, options, settings, out_dir, progress):
    """Load the image pool (training images, then pseudo-subjects, then generated images) and build
    (or reuse) the pair table."""
    image_set = ImageSet.coerce(images, options, progress, "indexing training images") if images else None
    if image_set is None and settings.synthetic_subjects == 0:
        raise DeepSSIMError(
            "training needs images (--images DIR) or synthetic subjects (--synthetic-subjects N)"
        )
    generated_set = (
        ImageSet.coerce(generated, options, progress, "indexing generated images") if generated else None
    )
    shape = image_set.shape if image_set is not None else SYNTHETIC_SIZE
    if generated_set is not None and generated_set.shape != shape:
        raise DeepSSIMError(
            f"training images are {shape} but generated images are {generated_set.shape}; pass --size HxW"
        )
    if pairs_csv and (generated_set is None or image_set is None or settings.synthetic_subjects):
        raise DeepSSIMError(
            "a pairs file needs --images (training) and --generated images, and no synthetic subjects"
        )
    parts, keys, groups, stacks, levels, slice_index = [], [], [], [], [], []
    if image_set is not None:
        parts.append(zscore(image_set.read()).astype(np.float32))
        keys += list(image_set.keys)
        files = [str(ref.path) for ref in image_set.refs]
        if len(set(files)) < 2 and not settings.synthetic_subjects:
            warnings.warn(
                "all training images come from one file: validation slices are split from "
                "the same volume, so validation numbers are optimistic",
                stacklevel=2,
            )
            files = list(image_set.keys)
        groups += files
        stacks += files
        levels += [""] * len(files)
        slice_index += [-1 if ref.index is None else ref.index for ref in image_set.refs]
    if settings.synthetic_subjects:
        synthetic, names, indices = _synthetic_pool(settings, shape, out_dir, progress)
        parts.append(synthetic)
        keys += [f"{name}#{index}" for name, index in zip(names, indices, strict=True)]
        groups += [name.split("/")[0] for name in names]  # split by subject, not by axis
        stacks += names
        levels += [name.split("/")[1] for name in names]
        slice_index += indices.tolist()
    n_training = sum(len(part) for part in parts)
    if generated_set is not None:
        parts.append(zscore(generated_set.read()).astype(np.float32))
        keys += [f"generated:{k}" for k in generated_set.keys]
    pool = np.concatenate(parts)
    sampling = {
        "n_pairs": settings.n_pairs,
        "val_fraction": settings.val_fraction,
        "seed": settings.seed,
        "synthetic_subjects": settings.synthetic_subjects,
        "slices_per_subject": settings.slices_per_subject,
        **({} if settings.pair_kinds == "all" else {"pair_kinds": settings.pair_kinds}),
        "pairs_csv": Path(pairs_csv).read_text(encoding="utf-8") if pairs_csv else None,
    }
    key = fingerprint(pool, keys, sampling)
    cache = out_dir / "pairs.npz"
    table = PairTable.load_cached(cache, key)
    if table is None:
        if progress:
            print("computing SSIM targets of the training pairs ...")
        if pairs_csv:
            table = pairs_from_csv(
                pairs_csv, image_set.keys, generated_set.keys, pool, settings.val_fraction, settings.seed
            )
        else:
            table = sample_pairs(
                pool,
                groups,
                np.array(slice_index),
                settings.n_pairs,
                settings.val_fraction,
                settings.seed,
                np.arange(n_training, len(pool)) if generated_set is not None else None,
                stacks=stacks,
                levels=levels,
                kinds=settings.pair_kinds,
            )
        table.save(cache, key)
    # the retrieval loss's hard negatives; without that loss nothing reads them
    neighbours = _neighbour_table(stacks, slice_index, len(pool)) if settings.ranking_weight > 0 else None
    return pool, table, neighbours


def _synthetic_pool(settings: TrainSettings, shape, out_dir: Path, progress: bool):
    """The pseudo-subjects' z-scored slices, group names and slice indices, cached in
    ``out_dir/synthetic.npz`` (a resumed run, or runs that differ only in training, skip synthesis)."""
    from deepssim.training.synthetic import synthetic_subjects

    identity = json.dumps(
        [
            settings.synthetic_subjects,
            settings.slices_per_subject,
            settings.seed,
            list(shape),
            settings.synthetic_contrast,
        ]
    )
    cache = out_dir / "synthetic.npz"
    try:
        with np.load(cache, allow_pickle=False) as data:
            if str(data["identity"]) == identity:
                return data["images"], [str(n) for n in data["names"]], data["indices"]
    except (OSError, KeyError, ValueError):
        pass
    if progress:
        print(f"synthesising {settings.synthetic_subjects} pseudo-subjects ...")
    synthetic, names, indices = synthetic_subjects(
        settings.synthetic_subjects,
        settings.slices_per_subject,
        seed=settings.seed,
        size=shape,
        contrast=settings.synthetic_contrast,
    )
    images = zscore(synthetic).astype(np.float32)
    with atomic_path(cache, suffix=".npz") as temporary, open(temporary, "wb") as handle:
        np.savez(handle, identity=np.array(identity), images=images, names=np.array(names), indices=indices)
    return images, names, indices


def _neighbour_table(stacks: list[str], slice_index: list[int], n_images: int) -> np.ndarray:
    """(n_images, 2 * MAX_RANKING_OFFSET) pool rows of each image's slices 1-3 away in its stack,
    -1 where there is none: the hard negatives of the retrieval loss."""
    row_of = {(stack, index): row for row, (stack, index) in enumerate(zip(stacks, slice_index, strict=True))}
    offsets = [d * sign for d in range(1, MAX_RANKING_OFFSET + 1) for sign in (-1, 1)]
    table = np.full((n_images, len(offsets)), -1, dtype=np.int64)
    for row, (stack, index) in enumerate(zip(stacks, slice_index, strict=True)):
        if index >= 0:
            table[row] = [row_of.get((stack, index + d), -1) for d in offsets]
    return table


def _parameter_groups(network, settings: TrainSettings) -> list[dict]:
    groups = network.layer_groups()
    out = []
    for depth, parameters in enumerate(groups):
        trainable = [p for p in parameters if p.requires_grad]
        if trainable:
            factor = settings.layer_decay ** (len(groups) - 1 - depth)
            out.append({"params": trainable, "lr": settings.learning_rate * factor})
    return out


def _warmup_cosine(total_steps: int):
    warmup = max(1, int(WARMUP_SHARE * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _views(pool, pairs: PairTable, augmentation: str, seed: int, channels: int, device) -> torch.Tensor:
    """Both images of each pair, independently augmented: (2B, channels, H, W)."""
    first = torch.from_numpy(pool[pairs.first]).unsqueeze(1).to(device)
    second = torch.from_numpy(second_images(pool, pairs).astype(np.float32)).unsqueeze(1).to(device)
    views = torch.cat(
        [augment_batch(first, augmentation, seed), augment_batch(second, augmentation, seed + 1)]
    )
    return views.expand(-1, channels, -1, -1).contiguous(memory_format=torch.channels_last)


def _embed(network, views: torch.Tensor, precision: str) -> torch.Tensor:
    """The network's float32 embeddings of a batch, computed in ``precision``."""
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision)
    with torch.autocast(views.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return network(views).float()


def _cosine(network, views: torch.Tensor, precision: str) -> torch.Tensor:
    first, second = _embed(network, views, precision).chunk(2)
    return F.cosine_similarity(first, second, dim=1)


def _train_epoch(network, optimizer, scheduler, pool, neighbours, pairs, settings, epoch, progress) -> float:
    network.train()
    device = torch.device(settings.device)
    order = np.random.default_rng(derived_seed(settings.seed, epoch)).permutation(len(pairs))
    batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    scaler = torch.amp.GradScaler(enabled=settings.precision == "float16")
    losses = []
    bar = progress_bar(len(batches), f"epoch {epoch + 1}/{settings.epochs}", "batch", progress)
    for step, rows in enumerate(batches):
        seed = derived_seed(settings.seed, epoch, step)
        batch = pairs.select(rows)
        views = _views(pool, batch, settings.augmentation, seed, network.input_channels, device)
        target = torch.from_numpy(batch.ssim.astype(np.float32)).to(device)
        torch.manual_seed(seed + 2)  # dropout
        mse = F.mse_loss(_cosine(network, views, settings.precision), target)
        loss = mse
        if settings.ranking_weight > 0:
            loss = loss + settings.ranking_weight * _ranking_loss(
                network, pool, neighbours, batch, settings, seed
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(network.parameters(), settings.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(mse.item())
        bar.set_postfix(mse=f"{np.mean(losses[-20:]):.4f}")
        bar.update()
    bar.close()
    return float(np.mean(losses))


def _ranking_loss(
    network, pool, neighbours, batch: PairTable, settings: TrainSettings, seed: int
) -> torch.Tensor:
    """The retrieval loss: a degraded, augmented copy of each of the batch's first quarter of
    anchor images must pick its own (clean) image among all anchors and one neighbouring slice
    of each (the hard negatives the scan's retrieval confuses a copy with). ``margin``: the mean
    over copies of how far their hardest other image comes within ``ranking_margin`` of their own
    (zero once it is beaten: the cosine keeps the SSIM scale); ``infonce``: cross-entropy of the
    softmax over the gallery at ``ranking_temperature``."""
    rng = np.random.default_rng(derived_seed(seed, 3))
    anchors = batch.first[: max(2, settings.batch_size // 4)]
    candidates = neighbours[anchors]
    picks = [row[row >= 0] for row in candidates]
    negatives = np.array([rng.choice(p) if len(p) else -1 for p in picks], dtype=np.int64)
    negatives = negatives[negatives >= 0]
    gallery_rows = np.concatenate([anchors, negatives])
    copies = np.stack([degrade(pool[a], int(rng.integers(2**62)), RANKING_COPY_STRENGTH) for a in anchors])
    device = torch.device(settings.device)
    queries = augment_batch(
        torch.from_numpy(copies.astype(np.float32)).unsqueeze(1).to(device), settings.augmentation, seed + 3
    )
    gallery = torch.from_numpy(pool[gallery_rows]).unsqueeze(1).to(device)
    views = torch.cat([queries, gallery]).expand(-1, network.input_channels, -1, -1)
    views = views.contiguous(memory_format=torch.channels_last)
    embeddings = F.normalize(_embed(network, views, settings.precision), dim=1)
    similarity = embeddings[: len(anchors)] @ embeddings[len(anchors) :].T
    # the same image drawn twice (as another anchor or as a neighbour) is not a negative
    same = torch.from_numpy(gallery_rows[None, :] == anchors[:, None]).to(device)
    same.fill_diagonal_(False)
    own = torch.arange(len(anchors), device=device)
    if settings.ranking_loss == "infonce":
        logits = (similarity / settings.ranking_temperature).masked_fill(same, float("-inf"))
        return F.cross_entropy(logits, own)
    others = similarity.masked_fill(same, float("-inf"))
    others[own, own] = float("-inf")
    hardest = others.max(dim=1).values
    return F.relu(hardest - similarity[own, own] + settings.ranking_margin).mean()


@torch.no_grad()
def predict_pairs(network, pool, pairs: PairTable, augmentation: str, settings: TrainSettings) -> np.ndarray:
    """Cosine scores of the pairs' views; the misaligned views are the same in every epoch."""
    network.eval()
    device = torch.device(settings.device)
    scores = []
    for start in range(0, len(pairs), settings.batch_size):
        batch = pairs.select(np.arange(start, min(start + settings.batch_size, len(pairs))))
        seed = derived_seed(settings.seed, 2**31, start)
        views = _views(pool, batch, augmentation, seed, network.input_channels, device)
        scores.append(_cosine(network, views, settings.precision).cpu().numpy())
    return np.concatenate(scores)


def regression_metrics(predicted: np.ndarray, target: np.ndarray) -> dict:
    """MSE, MAE and Pearson correlation of predicted scores against SSIM targets."""
    error = predicted - target
    pearson = float(np.corrcoef(predicted, target)[0, 1]) if predicted.std() > 0 and target.std() > 0 else 0.0
    return {"mse": float(np.mean(error**2)), "mae": float(np.mean(np.abs(error))), "pearson": pearson}


def _summary(settings, log, image_count, train_pairs, val_pairs) -> dict:
    best = min(log, key=lambda r: (r["val_aligned_mse"] + r["val_misaligned_mse"]) / 2)
    return {
        "settings": asdict(settings),
        "images": image_count,
        "train_pairs": len(train_pairs),
        "val_pairs": len(val_pairs),
        "epochs_run": sum(1 for r in log if r["epoch"] > 0),
        "best_epoch": best["epoch"],
        "best_validation": {k: v for k, v in best.items() if k.startswith("val_")},
        "training_seconds": round(sum(r["seconds"] for r in log), 1),
        "torch_threads": torch.get_num_threads(),
    }


def _write_log(path: Path, log: list[dict]) -> None:
    rows = [{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in log]
    write_rows_atomic(path, rows, LOG_COLUMNS)


def _save_state(path, epoch, best_score, log, network, optimizer, scheduler, settings_json) -> None:
    state = {
        "network": {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()},
        "epoch": epoch,
        "best_score": best_score,
        "log": log,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "settings": settings_json,
    }
    with atomic_path(path, suffix=".pt") as temporary:
        torch.save(state, temporary)


def _restore(state_path: Path, network, optimizer, scheduler, settings_json):
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unreadable state: the user must decide
        raise DeepSSIMError(
            f"{state_path}: cannot read the resume state ({error}); delete it to start over"
        ) from None
    if state.get("settings") != settings_json:
        raise DeepSSIMError(
            f"{state_path.parent} holds a run with other settings; use another --out folder, "
            "the same settings, or --restart"
        )
    network.load_state_dict(state["network"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["epoch"], state["best_score"], state["log"]
