"""The case study: a memorisation-prone latent diffusion model built on MONAI.

MONAI's AutoencoderKL (L1 + KL, optional patch adversarial loss) compresses images to
latents; a DiffusionModelUNet learns DDPM noise prediction on them (scaled-linear betas
0.0015-0.0205, 1000 steps); images are sampled with DDIM (50 steps). Memorisation is provoked
as in the paper by duplicating training images: ``none``; ``low`` (each image repeated 1-4
extra times at random); ``high`` (1-14). Optionally the UNet is conditioned (cross-attention)
on per-image variables from a CSV (``key`` column + numeric columns, z-scored).

A run folder holds ``run.json`` (configuration, duplication, scale factor), the weights
(``vae.safetensors``, ``unet.safetensors``), resume states (``*_state.pt``, tensors and plain
values only, read with ``weights_only=True``) and CSV logs. Training resumes from the last
finished epoch; every random draw is seeded from (seed, epoch, step).

The perceptual loss of the paper's autoencoder is not used: it needs pretrained LPIPS weights,
which cannot be downloaded here.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional as F

from deepssim.errors import DeepSSIMError
from deepssim.extras import require
from deepssim.io.files import atomic_path, write_rows_atomic, write_text_atomic
from deepssim.io.load import ImageSet, LoadOptions
from deepssim.progress import progress_iter
from deepssim.seeds import derived_seed

if TYPE_CHECKING:
    from deepssim.monitor import MemorisationMonitor

CHECKPOINT_SECONDS = 30.0  # an interrupted run loses at most this much training
DUPLICATION_EXTRA = {"none": (0, 0), "low": (1, 4), "high": (1, 14)}


@dataclass
class LDMConfig:
    """Architecture and training settings. ``small`` trains on 2 CPU cores; ``paper`` is the
    authors' configuration (136x112 brain slices, for a GPU)."""

    image_size: tuple[int, int] = (64, 64)
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_res_blocks: int = 1
    latent_channels: int = 3
    vae_norm_groups: int = 16
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_attention: tuple[bool, ...] = (False, True, True)
    unet_res_blocks: int = 1
    unet_head_channels: int = 16
    unet_norm_groups: int = 16
    vae_epochs: int = 30
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    adversarial_weight: float = 0.0
    diffusion_epochs: int = 100
    diffusion_batch_size: int = 32
    diffusion_lr: float = 5e-4
    train_timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0205
    sampling_steps: int = 50


CONFIGS = {
    "small": LDMConfig(),
    "paper": LDMConfig(
        image_size=(136, 112),
        vae_channels=(64, 128, 128),
        vae_res_blocks=2,
        vae_norm_groups=32,
        unet_channels=(256, 512, 768),
        unet_attention=(False, True, True),
        unet_res_blocks=2,
        unet_head_channels=64,
        unet_norm_groups=32,
        vae_epochs=100,
        vae_batch_size=16,
        vae_lr=1e-4,
        adversarial_weight=0.125,
        diffusion_epochs=150,
        diffusion_batch_size=32,
        diffusion_lr=2.5e-5,
    ),
}


@dataclass
class RunInfo:
    config: LDMConfig
    duplication: str = "none"
    seed: int = 0
    keys: list[str] = field(default_factory=list)
    repeats: list[int] = field(default_factory=list)
    conditions: list[list[float]] | None = None
    condition_columns: list[str] | None = None
    scale_factor: float | None = None

    def save(self, run: Path) -> None:
        write_text_atomic(run / "run.json", json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, run: Path) -> RunInfo:
        path = Path(run) / "run.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            config = LDMConfig(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in data.pop("config").items()}
            )
            return cls(config=config, **data)
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise DeepSSIMError(f"{path}: not a run written by `deepssim ldm train-vae` ({error})") from None


def make_vae(config: LDMConfig):
    require("monai")
    from monai.networks.nets import AutoencoderKL

    levels = len(config.vae_channels)
    return AutoencoderKL(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=config.vae_channels,
        latent_channels=config.latent_channels,
        num_res_blocks=config.vae_res_blocks,
        attention_levels=(False,) * levels,
        norm_num_groups=config.vae_norm_groups,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


def make_unet(config: LDMConfig, condition_dim: int | None):
    require("monai")
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        channels=config.unet_channels,
        attention_levels=config.unet_attention,
        num_res_blocks=config.unet_res_blocks,
        num_head_channels=config.unet_head_channels,
        norm_num_groups=config.unet_norm_groups,
        with_conditioning=condition_dim is not None,
        cross_attention_dim=condition_dim,
    )


def make_scheduler(config: LDMConfig, kind: str = "ddpm"):
    require("monai")
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    scheduler = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    return scheduler(
        num_train_timesteps=config.train_timesteps,
        schedule="scaled_linear_beta",
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        clip_sample=False,
    )


def repetition_counts(count: int, duplication: str, seed: int) -> list[int]:
    """How many times each training image is seen per epoch under a duplication level."""
    if duplication not in DUPLICATION_EXTRA:
        raise DeepSSIMError(f"duplication must be one of {', '.join(DUPLICATION_EXTRA)}, not {duplication!r}")
    low, high = DUPLICATION_EXTRA[duplication]
    rng = np.random.default_rng([seed, 7])
    extra = rng.integers(low, high + 1, count) if high else np.zeros(count, dtype=int)
    return (1 + extra).tolist()


def _images(images, config: LDMConfig, options: LoadOptions | None, progress: bool):
    """Training images scaled to [0, 1] per image at the configuration's size."""
    options = options or LoadOptions()
    options = LoadOptions(**{**asdict(options), "size": config.image_size, "fit": "resize"})
    image_set = ImageSet.coerce(images, options, progress)
    stack = image_set.read()
    low = stack.min(axis=(1, 2), keepdims=True)
    high = stack.max(axis=(1, 2), keepdims=True)
    return image_set.keys, torch.from_numpy(((stack - low) / (high - low)).astype(np.float32)).unsqueeze(1)


def _read_conditions(path, keys: list[str]) -> tuple[list[list[float]], list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "key" not in rows[0]:
        raise DeepSSIMError(f"{path}: a conditions CSV needs a 'key' column and numeric variables")
    columns = [c for c in rows[0] if c != "key"]
    by_key = {row["key"]: row for row in rows}
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise DeepSSIMError(f"{path}: no conditions for {len(missing)} image(s), e.g. {missing[0]!r}")
    try:
        values = np.array([[float(by_key[k][c]) for c in columns] for k in keys])
    except ValueError as error:
        raise DeepSSIMError(f"{path}: conditions must be numbers ({error})") from None
    values = (values - values.mean(axis=0)) / np.where(values.std(axis=0) > 0, values.std(axis=0), 1)
    return values.tolist(), columns


def _batches(order: np.ndarray, size: int) -> list[np.ndarray]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def _save_weights(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path, suffix=".safetensors") as temporary:
        save_file(state, str(temporary))


def _load_weights(module: torch.nn.Module, path: Path, what: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise DeepSSIMError(f"{path}: missing; run `deepssim ldm {what}` first")
    try:
        weights = load_file(path)
    except (SafetensorError, OSError) as error:
        raise DeepSSIMError(
            f"{path}: not a readable safetensors file ({str(error).splitlines()[0]}); it may be truncated "
            f"or corrupt: delete it and rerun `deepssim ldm {what}`"
        ) from None
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise DeepSSIMError(
            f"{path}: does not match this run's configuration ({str(error).splitlines()[0]})"
        ) from None


def _save_state(path: Path, state: dict) -> None:
    with atomic_path(path, suffix=".pt") as temporary:
        torch.save(state, temporary)


def _load_state(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - an unreadable state must not be trusted
        raise DeepSSIMError(
            f"{path}: cannot read the resume state ({error}); delete it to start over"
        ) from None


def train_vae(
    images,
    run,
    config: str | LDMConfig = "small",
    duplication: str = "none",
    conditions=None,
    seed: int = 0,
    options: LoadOptions | None = None,
    progress: bool = False,
    **overrides,
) -> Path:
    """Train the autoencoder of a new run (or resume it); returns the run folder.

    The duplication level and conditions are fixed here for the whole run.
    """
    if isinstance(config, str):
        if config not in CONFIGS:
            raise DeepSSIMError(f"unknown configuration {config!r}; choose one of {', '.join(CONFIGS)}")
        config = CONFIGS[config]
    config = LDMConfig(**{**asdict(config), **{k: v for k, v in overrides.items() if v is not None}})
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    keys, data = _images(images, config, options, progress)
    info = RunInfo(config, duplication, seed, keys, repetition_counts(len(keys), duplication, seed))
    if conditions:
        info.conditions, info.condition_columns = _read_conditions(conditions, keys)
    if (run / "run.json").exists():
        previous = RunInfo.load(run)
        if (asdict(previous.config), previous.duplication, previous.seed, previous.keys) != (
            asdict(config),
            duplication,
            seed,
            keys,
        ):
            raise DeepSSIMError(f"{run} holds a run with other settings or images; use another --run folder")
        info.scale_factor = previous.scale_factor
    info.save(run)
    torch.manual_seed(seed)
    vae = make_vae(config)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.vae_lr)
    discriminator = adversary = None
    if config.adversarial_weight > 0:
        from monai.losses import PatchAdversarialLoss
        from monai.networks.nets import PatchDiscriminator

        discriminator = PatchDiscriminator(
            spatial_dims=2, num_layers_d=3, channels=32, in_channels=1, out_channels=1
        )
        adversary = torch.optim.Adam(discriminator.parameters(), lr=config.vae_lr)
        adversarial_loss = PatchAdversarialLoss(criterion="least_squares")
    state = _load_state(run / "vae_state.pt")
    start, log = 0, []
    if state is not None:
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        if discriminator is not None:
            discriminator.load_state_dict(state["discriminator"])
            adversary.load_state_dict(state["adversary"])
        start, log = state["epoch"], state["log"]
    checkpoint = _Every(CHECKPOINT_SECONDS)
    order_pool = np.repeat(np.arange(len(keys)), info.repeats)
    for epoch in range(start, config.vae_epochs):
        vae.train()
        order = np.random.default_rng(derived_seed(seed, 1, epoch)).permutation(order_pool)
        losses = []
        batches = _batches(order, config.vae_batch_size)
        for step, rows in enumerate(
            progress_iter(batches, f"VAE epoch {epoch + 1}/{config.vae_epochs}", "batch", progress)
        ):
            torch.manual_seed(derived_seed(seed, 1, epoch, step))
            batch = data[rows]
            reconstruction, mu, sigma = vae(batch)
            kl = 0.5 * torch.mean(
                torch.sum(mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2)) - 1, dim=(1, 2, 3))
            )
            loss = F.l1_loss(reconstruction, batch) + config.kl_weight * kl
            if discriminator is not None:
                fake = discriminator(reconstruction.contiguous().float())[-1]
                loss = loss + config.adversarial_weight * adversarial_loss(
                    fake, target_is_train=True, for_discriminator=False
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if discriminator is not None:
                fake = discriminator(reconstruction.detach().contiguous())[-1]
                train = discriminator(batch)[-1]
                d_loss = 0.5 * (
                    adversarial_loss(fake, target_is_train=False, for_discriminator=True)
                    + adversarial_loss(train, target_is_train=True, for_discriminator=True)
                )
                adversary.zero_grad(set_to_none=True)
                (config.adversarial_weight * d_loss).backward()
                adversary.step()
            losses.append(F.l1_loss(reconstruction, batch).item())
        log.append({"epoch": epoch + 1, "l1": float(np.mean(losses))})
        if not checkpoint(force=epoch + 1 == config.vae_epochs):
            continue
        _save_weights(vae, run / "vae.safetensors")
        state = {"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "log": log}
        if discriminator is not None:
            state.update(discriminator=discriminator.state_dict(), adversary=adversary.state_dict())
        _save_state(run / "vae_state.pt", state)
        write_rows_atomic(run / "log_vae.csv", log)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(data[i : i + 64])[0] for i in range(0, len(data), 64)])
    info.scale_factor = float(1.0 / latents.std())
    info.save(run)
    return run


class _Every:
    """True at most once every ``seconds`` (always when forced): when a run saves its state, so
    that small epochs are not dominated by writing checkpoints."""

    def __init__(self, seconds: float):
        self.seconds, self.last = seconds, time.monotonic()

    def __call__(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self.last >= self.seconds:
            self.last = now
            return True
        return False


def _latent_padding(config: LDMConfig, latent_shape) -> tuple[int, int]:
    """Rows and columns to pad latents with so the UNet's downsamplings divide them."""
    multiple = 2 ** (len(config.unet_channels) - 1)
    return tuple((-size) % multiple for size in latent_shape)


def train_diffusion(
    images,
    run,
    seed: int | None = None,
    options: LoadOptions | None = None,
    progress: bool = False,
    epochs: int | None = None,
    monitor: MemorisationMonitor | None = None,
    monitor_steps: int = 20,
) -> Path:
    """Train the diffusion UNet of a run on the autoencoder's latents (or resume).

    monitor: a :class:`deepssim.monitor.MemorisationMonitor` of the run's training images (at
    the configuration's size), called after every optimisation step with a DDIM sampler of
    ``monitor_steps`` steps. Its ``stop`` ends training after that step, saved.
    """
    run = Path(run)
    info = RunInfo.load(run)
    config = (
        info.config if epochs is None else LDMConfig(**{**asdict(info.config), "diffusion_epochs": epochs})
    )
    if info.scale_factor is None:
        raise DeepSSIMError(f"{run}: the autoencoder is not trained yet; run `deepssim ldm train-vae` first")
    keys, data = _images(images, config, options, progress)
    if keys != info.keys:
        raise DeepSSIMError(f"{run} was trained on other images; pass the same --images as to train-vae")
    seed = info.seed if seed is None else seed
    vae = make_vae(config)
    _load_weights(vae, run / "vae.safetensors", "train-vae")
    vae.eval()
    with torch.no_grad():
        latents = (
            torch.cat([vae.encode(data[i : i + 64])[0] for i in range(0, len(data), 64)]) * info.scale_factor
        )
    pad_rows, pad_columns = _latent_padding(config, latents.shape[-2:])
    latents = F.pad(latents, (0, pad_columns, 0, pad_rows))
    conditions = None
    if info.conditions is not None:
        conditions = torch.tensor(info.conditions, dtype=torch.float32).unsqueeze(1)
    torch.manual_seed(seed)
    unet = make_unet(config, None if conditions is None else conditions.shape[-1])
    optimizer = torch.optim.Adam(unet.parameters(), lr=config.diffusion_lr)
    scheduler = make_scheduler(config)
    state = _load_state(run / "unet_state.pt")
    start, log = 0, []
    if state is not None:
        unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        start, log = state["epoch"], state["log"]
    checkpoint = _Every(CHECKPOINT_SECONDS)
    order_pool = np.repeat(np.arange(len(keys)), info.repeats)
    steps_per_epoch = len(_batches(order_pool, config.diffusion_batch_size))
    stop = False
    for epoch in range(start, config.diffusion_epochs):
        unet.train()
        order = np.random.default_rng(derived_seed(seed, 2, epoch)).permutation(order_pool)
        losses = []
        batches = _batches(order, config.diffusion_batch_size)
        for step, rows in enumerate(
            progress_iter(
                batches, f"diffusion epoch {epoch + 1}/{config.diffusion_epochs}", "batch", progress
            )
        ):
            generator = torch.Generator().manual_seed(derived_seed(seed, 2, epoch, step))
            batch = latents[rows]
            noise = torch.randn(batch.shape, generator=generator)
            timesteps = torch.randint(0, config.train_timesteps, (len(rows),), generator=generator)
            noisy = scheduler.add_noise(batch, noise, timesteps)
            context = None if conditions is None else conditions[rows]
            loss = F.mse_loss(unet(noisy, timesteps=timesteps, context=context), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if monitor is not None:
                unet.eval()
                stop = monitor(
                    epoch * steps_per_epoch + step + 1, _monitor_sampler(vae, unet, info, seed, monitor_steps)
                ).stop
                unet.train()
                if stop:
                    break
        log.append({"epoch": epoch + 1, "mse": float(np.mean(losses))})
        if not checkpoint(force=stop or epoch + 1 == config.diffusion_epochs):
            continue
        _save_weights(unet, run / "unet.safetensors")
        _save_state(
            run / "unet_state.pt",
            {"unet": unet.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "log": log},
        )
        write_rows_atomic(run / "log_diffusion.csv", log)
        if stop:
            break
    return run


def _monitor_sampler(vae, unet, info: RunInfo, seed: int, steps: int):
    """The monitor's sampler: unconditioned, or conditioned on random training images' variables."""

    def draw(count: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(derived_seed(seed, 4, count))
        context = None
        if info.conditions is not None:
            rows = torch.randint(0, len(info.conditions), (count,), generator=generator)
            context = torch.tensor(info.conditions, dtype=torch.float32)[rows].unsqueeze(1)
        with torch.no_grad():
            return sample(vae, unet, info, count, generator, context, steps)

    return draw


@torch.no_grad()
def sample(
    vae, unet, info: RunInfo, count: int, generator, context=None, steps: int | None = None
) -> np.ndarray:
    """``count`` images in [0, 1], (count, H, W), by DDIM with ``steps`` steps (default the config's)."""
    config = info.config
    scheduler = make_scheduler(config, "ddim")
    scheduler.set_timesteps(steps or config.sampling_steps)
    factor = 2 ** (len(config.vae_channels) - 1)
    latent_shape = (config.image_size[0] // factor, config.image_size[1] // factor)
    pad_rows, pad_columns = _latent_padding(config, latent_shape)
    z = torch.randn(
        (count, config.latent_channels, latent_shape[0] + pad_rows, latent_shape[1] + pad_columns),
        generator=generator,
    )
    for t in scheduler.timesteps:
        noise = unet(z, timesteps=torch.full((count,), int(t)), context=context)
        z, _ = scheduler.step(noise, t, z)
    z = z[..., : latent_shape[0], : latent_shape[1]] / info.scale_factor
    return vae.decode(z).clamp(0, 1)[:, 0].numpy()


@torch.no_grad()
def generate(
    run,
    out_dir,
    per_image: int = 30,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """Sample ``per_image`` images per training image with DDIM; write PNGs and a manifest.

    With conditions, the images generated for a training image are conditioned on its
    variables; without, the count only sets how many images are drawn.
    """
    from PIL import Image

    run, out_dir = Path(run), Path(out_dir)
    info = RunInfo.load(run)
    config = info.config
    vae = make_vae(config)
    _load_weights(vae, run / "vae.safetensors", "train-vae")
    conditions = (
        None if info.conditions is None else torch.tensor(info.conditions, dtype=torch.float32).unsqueeze(1)
    )
    unet = make_unet(config, None if conditions is None else conditions.shape[-1])
    _load_weights(unet, run / "unet.safetensors", "train-diffusion")
    vae.eval()
    unet.eval()
    sources = np.repeat(np.arange(len(info.keys)), per_image)
    manifest = []
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = _batches(np.arange(len(sources)), batch_size)
    for number, rows in enumerate(progress_iter(batches, "generating", "batch", progress)):
        generator = torch.Generator().manual_seed(derived_seed(seed, 3, number))
        context = None if conditions is None else conditions[sources[rows]]
        images = sample(vae, unet, info, len(rows), generator, context, steps)
        for row, image in zip(rows, images, strict=True):
            key = f"gen_{row:06d}"
            with atomic_path(out_dir / f"{key}.png", suffix=".png") as temporary:
                Image.fromarray(np.round(image * 65535).astype(np.uint16)).save(temporary, format="PNG")
            source = info.keys[sources[row]] if conditions is not None else ""
            manifest.append(
                {
                    "generated_key": key,
                    "run": str(run),
                    "seed": seed,
                    "batch": number,
                    "duplication": info.duplication,
                    "conditioned_on": source,
                }
            )
    write_rows_atomic(out_dir / "manifest.csv", manifest)
    settings = {
        "run": str(run),
        "per_image": per_image,
        "seed": seed,
        "sampling_steps": steps or config.sampling_steps,
        "sampler": "DDIM",
        "duplication": info.duplication,
        "images": len(manifest),
        "config": asdict(config),
    }
    write_text_atomic(out_dir / "manifest.json", json.dumps(settings, indent=2) + "\n")
    return settings
