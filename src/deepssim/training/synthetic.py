"""Domain-randomised pseudo-subjects from the MNI ICBM152 2009a tissue maps (after SynthSeg, Billot
et al. 2023; our own code).

Why: a network trained on ~10 real subjects learns their scanners. Here every seed is a new
"subject" whose anatomy, contrast and acquisition are drawn at random, so training can see as many
heads and scanners as it needs. Everything is a pure function of an int seed (numpy Generators).

Anatomy comes from the bundled ICBM152 2009a grey- and white-matter probability maps and the
(skull-stripped) T1 template in ``data/sources/``, resampled once to a 1.5 mm grid (cached):
brain mask = template > 0 (holes filled); CSF = brain mask x (1 - GM - WM), clipped. The template
has no head, so a CSF rim, skull and scalp are built as shells at random, unevenly varying
distances outside the brain; the grid is cut just below the brainstem like a scan's field of view.

Randomised per subject (``synthetic_volume`` params; ranges are uniform unless said):

- contrast: T1-like (p .30), T2-like (.20), PD-like (.10), FLAIR-like (.15) tissue means, each
  jittered by N(0, 0.04), or fully random (.25, every class U(0, 1)) for the classes background,
  CSF, GM, WM, skull, scalp, lesion;
- tissue-boundary sharpness: GM/WM/CSF probabilities raised to a power in 1-3 and renormalised;
- texture: per tissue a multiplicative smooth random modulation (amplitude 0.03-0.25; mix of
  1.5 (half weight), 5 and 15 mm correlation lengths) so tissues are not piecewise flat;
- head shells: CSF rim 0.5-3 mm, skull 3-8 mm, scalp 3-8 mm, each thickness varying +-30%;
  skull-stripped (p 0.25: everything outside the brain is background);
- lesions (p 0.3): 1-5 soft ellipsoids, semi-axes 1.5-7 mm, randomly oriented, confined to WM,
  with a contrast-dependent (or random) intensity;
- geometry: scale 0.85-1.15 per axis (head size and shape), rotation +-10 degrees about each
  axis, shift +-4 mm, smooth non-linear displacement (std 0-3 mm per component, ~20 mm
  correlation length).

Randomised per subject and slicing axis (the acquisition; seeded by (seed, axis), so an axis'
acquisition does not depend on which other axes are requested):

- slice thickness 1-7 mm: box average along the slicing axis (partial volume);
- in-plane resolution: either down- and up-sampling by 1-2.5x (p 0.5) or Gaussian blur with
  sigma 0-1 pixel;
- bias field: smooth multiplicative exp(field), field std 0-0.3 on a 4x4x4 control grid;
- Rician noise: SNR (brain mean / sigma) log-uniform 8-80;
- intensity gamma exp(N(0, 0.25)) after scaling to the subject's 99th brain percentile;
- field of view (slices only): zoom 0.8-1.25 and shift +-10% of the image size, shared by all
  slices of the acquisition so neighbouring slices stay aligned.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from deepssim.errors import DeepSSIMError
from deepssim.seeds import derived_seed

VOXEL_MM = 1.5
MARGIN_VOXELS = 15  # room for the synthetic skull and scalp around the brain (22.5 mm)
CLASSES = ("background", "csf", "gm", "wm", "skull", "scalp", "lesion")
CONTRASTS = {  # typical relative tissue means before jitter, in CLASSES order
    "T1": (0.0, 0.12, 0.45, 0.72, 0.08, 0.80, 0.30),
    "T2": (0.0, 0.95, 0.55, 0.38, 0.08, 0.55, 0.85),
    "PD": (0.0, 0.80, 0.68, 0.55, 0.10, 0.70, 0.78),
    "FLAIR": (0.0, 0.08, 0.55, 0.40, 0.06, 0.60, 0.90),
}
CONTRAST_P = {"T1": 0.30, "T2": 0.20, "PD": 0.10, "FLAIR": 0.15, "random": 0.25}
# "random": the contrast above per subject; "t1": every subject T1-like (the same random draws,
# so anatomy and acquisition stay those of "random": only the tissue means change)
CONTRAST_MODES = ("random", "t1")
SOURCE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
MIN_BRAIN_FRACTION = 0.3  # slices whose brain cross-section is under 30% of the largest are skipped
RUN_LENGTH = (8, 16)


def sources_dir() -> Path:
    """Where the MNI maps live: $DEEPSSIM_DATA_SOURCES, else the nearest enclosing data/sources/."""
    env = os.environ.get("DEEPSSIM_DATA_SOURCES")
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:  # src/deepssim/... -> the repository root
        if (parent / "data" / "sources" / SOURCE_FILES["gm"]).exists():
            return parent / "data" / "sources"
    return Path(__file__).resolve().parents[2] / "data" / "sources"


@dataclass(frozen=True)
class Atlas:
    """The tissue maps on the 1.5 mm working grid (float32, brain-centred, with a head margin)."""

    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray  # soft brain mask in [0, 1]
    dist: np.ndarray  # mm from the brain surface outwards (0 inside)
    wm_core: np.ndarray  # flat indices of voxels with WM > 0.9 (lesion centres)


@functools.lru_cache(maxsize=2)
def load_atlas(sources: str | None = None) -> Atlas:
    """Load, downsample and pad the maps once per process (about a second); later calls are free."""
    import nibabel as nib

    root = Path(sources) if sources else sources_dir()
    maps = {}
    for name, file in SOURCE_FILES.items():
        path = root / file
        if not path.exists():
            raise DeepSSIMError(
                f"{path} is missing: synthetic subjects need the MNI ICBM152 maps of the repository's "
                "data/sources/ (run data/assemble_sources.sh there), or DEEPSSIM_DATA_SOURCES set to "
                "a folder holding them"
            )
        maps[name] = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    brain = ndi.binary_fill_holes((maps["t1"] > 0) | (maps["gm"] + maps["wm"] > 127.5))

    def down(volume: np.ndarray) -> np.ndarray:
        small = ndi.zoom(ndi.gaussian_filter(volume, 0.5), 1 / VOXEL_MM, order=1)
        return np.clip(small, 0.0, 1.0).astype(np.float32)

    gm, wm = down(maps["gm"] / 255.0), down(maps["wm"] / 255.0)
    mask = down(brain.astype(np.float32))
    # Crop to the brain plus the margin, but not below the lowest brain voxel (the template's
    # brainstem is cut by its grid, as a scan's field of view would cut it).
    lo = np.array(
        [
            np.flatnonzero((mask > 0.5).any(axis=tuple(j for j in range(3) if j != a)))[[0, -1]]
            for a in range(3)
        ]
    )
    pad = [(MARGIN_VOXELS, MARGIN_VOXELS), (MARGIN_VOXELS, MARGIN_VOXELS), (0, MARGIN_VOXELS)]
    box = tuple(
        slice(lo[a, 0] - pad[a][0] + MARGIN_VOXELS, lo[a, 1] + 1 + pad[a][1] + MARGIN_VOXELS)
        for a in range(3)
    )
    gm, wm, mask = (np.pad(v, MARGIN_VOXELS)[box] for v in (gm, wm, mask))
    gm = np.minimum(gm, mask)
    wm = np.minimum(wm, mask)
    dist = (ndi.distance_transform_edt(mask < 0.5) * VOXEL_MM).astype(np.float32)
    return Atlas(gm, wm, mask, dist, np.flatnonzero(wm > 0.9))


# --------------------------------------------------------------------------- random fields


def _interp(volume: np.ndarray, positions: list[np.ndarray]) -> np.ndarray:
    """Separable linear interpolation at ``positions`` (one 1D array of source indices per axis):
    much faster than map_coordinates on a dense grid."""
    out = volume
    for axis, x in enumerate(positions):
        n = volume.shape[axis]
        x = np.clip(np.asarray(x, np.float64), 0, n - 1)
        i0 = np.clip(np.floor(x).astype(int), 0, max(n - 2, 0))
        f = np.asarray(x - i0, np.float32).reshape([-1 if k == axis else 1 for k in range(out.ndim)])
        a = np.take(out, i0, axis=axis)
        b = np.take(out, np.minimum(i0 + 1, n - 1), axis=axis)
        out = a + (b - a) * f
    return np.asarray(out, np.float32)


def _resize(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Resample a (small) array to exactly ``shape``, corners aligned, linearly."""
    return _interp(volume, [np.linspace(0, n - 1, m) for n, m in zip(volume.shape, shape, strict=True)])


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], length_mm: float) -> np.ndarray:
    """Zero-mean, unit-std random field with roughly ``length_mm`` correlation length."""
    step = max(1, int(length_mm / VOXEL_MM / 2))
    small_shape = tuple(max(2, -(-n // step) + 1) for n in shape)
    small = ndi.gaussian_filter(
        rng.standard_normal(small_shape, dtype=np.float32),
        max(0.5, length_mm / VOXEL_MM / step / 2),
        mode="wrap",
    )
    field = _resize(small, shape) if step > 1 else small[tuple(slice(0, n) for n in shape)]
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _soft_below(d: np.ndarray, edge: np.ndarray | float, width: float = VOXEL_MM) -> np.ndarray:
    """1 where d < edge, 0 where d > edge, linear over ``width`` mm (partial volume at the edge)."""
    return np.clip((edge - d) / width + 0.5, 0.0, 1.0)


# --------------------------------------------------------------------------- subject


@dataclass
class _Subject:
    image: np.ndarray  # warped, textured tissue intensities (no acquisition effects)
    brain: np.ndarray  # warped soft brain mask
    tissue_half: dict  # warped GM and WM maps on every 2nd voxel (for checks; cheap)
    background: float
    reference: float  # 99th percentile inside the brain: the intensity scale
    params: dict


def _draw_contrast(rng: np.random.Generator, contrast: str = "random") -> tuple[str, np.ndarray]:
    names = list(CONTRAST_P)
    mode = names[rng.choice(len(names), p=list(CONTRAST_P.values()))]
    if contrast == "t1":
        mode = "T1"
    if mode == "random":
        return mode, rng.uniform(0.0, 1.0, len(CLASSES))
    means = np.array(CONTRASTS[mode]) + rng.normal(0.0, 0.04, len(CLASSES))
    means[0] = abs(means[0]) * 0.5  # background stays near black for physical contrasts
    return mode, np.clip(means, 0.0, 1.0)


def _lesions(rng: np.random.Generator, atlas: Atlas, count: int) -> tuple[np.ndarray, list]:
    """Soft ellipsoids centred in deep WM, confined to WM (so their shape follows the tracts)."""
    shape = atlas.wm.shape
    field = np.zeros(shape, np.float32)
    drawn = []
    for _ in range(count):
        centre = np.array(np.unravel_index(atlas.wm_core[rng.integers(len(atlas.wm_core))], shape))
        radii = rng.uniform(1.5, 7.0, 3) / VOXEL_MM
        q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        reach = int(math.ceil(radii.max())) + 2
        lo = np.maximum(centre - reach, 0)
        hi = np.minimum(centre + reach + 1, shape)
        grid = np.stack(
            np.meshgrid(
                *[np.arange(a, b) - c for a, b, c in zip(lo, hi, centre, strict=True)], indexing="ij"
            ),
            axis=-1,
        ).astype(np.float32)
        r = np.sqrt((((grid @ q) / radii) ** 2).sum(-1))
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        field[box] = np.maximum(field[box], np.clip((1.0 - r) * 3.0, 0.0, 1.0))
        drawn.append({"centre_voxel": centre.tolist(), "semi_axes_mm": (radii * VOXEL_MM).round(2).tolist()})
    return field * atlas.wm, drawn


def _warp_coordinates(rng: np.random.Generator, shape: tuple[int, ...], params: dict) -> np.ndarray:
    """Source coordinates (3, *shape) for each output voxel: inverse affine plus smooth displacement."""
    scale = rng.uniform(0.85, 1.15, 3)
    angles = rng.uniform(-10.0, 10.0, 3)
    shift = rng.uniform(-4.0, 4.0, 3) / VOXEL_MM
    disp_mm = rng.uniform(0.0, 3.0)
    rot = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(angles)):
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = math.cos(angle)
        r[i, j], r[j, i] = -math.sin(angle), math.sin(angle)
        rot = rot @ r
    inverse = np.linalg.inv(rot @ np.diag(scale)).astype(np.float32)
    centre = (np.array(shape) - 1) / 2.0
    axes = [np.arange(n, dtype=np.float32) - c - s for n, c, s in zip(shape, centre, shift, strict=True)]
    coords = np.empty((3, *shape), np.float32)
    for i in range(3):
        coords[i] = centre[i]
        for j in range(3):
            coords[i] += inverse[i, j] * axes[j].reshape([-1 if k == j else 1 for k in range(3)])
    for i in range(3):
        coords[i] += _smooth_noise(rng, shape, 20.0) * (disp_mm / VOXEL_MM)
    params.update(
        scale=scale.round(4).tolist(),
        rotation_deg=angles.round(3).tolist(),
        shift_mm=(shift * VOXEL_MM).round(3).tolist(),
        displacement_std_mm=round(disp_mm, 3),
    )
    return coords


@functools.lru_cache(maxsize=4)
def _subject(seed: int, contrast: str = "random") -> _Subject:
    """Anatomy, contrast and deformation of pseudo-subject ``seed`` (cached: all axes share it)."""
    atlas = load_atlas()
    rng = np.random.default_rng(derived_seed(seed, 0))
    shape = atlas.gm.shape
    params: dict = {"seed": int(seed), "voxel_mm": VOXEL_MM}
    mode, means = _draw_contrast(rng, contrast)
    sharpness = rng.uniform(1.0, 3.0)
    stripped = bool(rng.random() < 0.25)
    n_lesions = int(rng.integers(1, 6)) if rng.random() < 0.3 else 0
    shells = rng.uniform([0.5, 3.0, 3.0], [3.0, 8.0, 8.0])

    # Brain tissues, sharpened: the population maps are blurrier than one person's anatomy.
    csf = np.clip(atlas.brain - atlas.gm - atlas.wm, 0.0, 1.0)
    probs = [np.power(p + 1e-4, sharpness) for p in (csf, atlas.gm, atlas.wm)]
    total = probs[0] + probs[1] + probs[2]
    probs = [p * (atlas.brain / total) for p in probs]
    # Head shells outside the brain, with unevenly varying thickness.
    outside = 1.0 - atlas.brain
    wobble = 1.0 + 0.3 * np.clip(_smooth_noise(rng, shape, 30.0), -2.0, 2.0) / 2.0
    edges = np.cumsum(shells)
    below = [_soft_below(atlas.dist, e * wobble) for e in edges]
    rim, skull, scalp = below[0], below[1] - below[0], below[2] - below[1]
    background = 1.0 - below[2]
    tissue = {
        "background": background * outside,
        "csf": probs[0] + rim * outside,
        "gm": probs[1],
        "wm": probs[2],
        "skull": skull * outside,
        "scalp": scalp * outside,
    }
    if stripped:
        tissue["background"] = outside
        tissue["csf"] = probs[0]
        tissue["skull"] = tissue["scalp"] = None

    fields = [_smooth_noise(rng, shape, length) for length in (1.5, 5.0, 15.0)]
    image = np.zeros(shape, np.float32)
    texture = {}
    for k, name in enumerate(CLASSES[:-1]):
        amp = float(rng.uniform(0.03, 0.25))
        weights = rng.dirichlet([0.5, 1.0, 1.0])
        if tissue[name] is None:
            continue
        if name == "background":
            image += tissue[name] * means[k]
            continue
        mod = 1.0 + amp * (0.5 * weights[0] * fields[0] + weights[1] * fields[1] + weights[2] * fields[2])
        image += tissue[name] * (means[k] * np.clip(mod, 0.3, 2.0))
        texture[name] = round(amp, 4)
    lesions = []
    if n_lesions:
        lesion, lesions = _lesions(rng, atlas, n_lesions)
        image = image * (1.0 - lesion) + lesion * means[-1]

    coords = _warp_coordinates(rng, shape, params)
    background_level = float(means[0])
    warped = ndi.map_coordinates(
        image, coords, order=1, mode="constant", cval=background_level, output=np.float32
    )
    brain = ndi.map_coordinates(atlas.brain, coords, order=1, mode="constant", cval=0.0, output=np.float32)
    half = coords[:, ::2, ::2, ::2]
    tissue_half = {
        name: ndi.map_coordinates(
            getattr(atlas, name), half, order=1, mode="constant", cval=0.0, output=np.float32
        )
        for name in ("gm", "wm")
    }
    inside = warped[brain > 0.5]
    reference = max(float(np.percentile(inside, 99)), float(warped.max()) * 0.05, 1e-3)
    params.update(
        contrast=mode,
        means=dict(zip(CLASSES, np.round(means, 4).tolist(), strict=True)),
        sharpness=round(sharpness, 3),
        skull_stripped=stripped,
        shells_mm=dict(zip(("csf_rim", "skull", "scalp"), shells.round(2).tolist(), strict=True)),
        texture_amplitude=texture,
        lesions=lesions,
    )
    return _Subject(warped, brain, tissue_half, background_level, reference, params)


# --------------------------------------------------------------------------- acquisition


def _acquisition_params(seed: int, axis: int, slab_mm: float | None) -> tuple[dict, np.random.Generator]:
    """Scanner settings of subject ``seed`` sliced along ``axis``; also the generator for its noise."""
    rng = np.random.default_rng(derived_seed(seed, 1, axis))
    thickness = float(rng.uniform(1.0, 7.0))
    resample = bool(rng.random() < 0.5)
    factor = float(rng.uniform(1.0, 2.5))
    sigma = float(rng.uniform(0.0, 1.0))
    bias_std = float(rng.uniform(0.0, 0.3))
    bias = rng.standard_normal((4, 4, 4)).astype(np.float32) * bias_std
    snr = float(math.exp(rng.uniform(math.log(8.0), math.log(80.0))))
    gamma = float(math.exp(rng.normal(0.0, 0.25)))
    zoom = float(rng.uniform(0.8, 1.25))
    offset = rng.uniform(-0.1, 0.1, 2)
    params = {
        "axis": int(axis),
        "thickness_mm": float(slab_mm) if slab_mm is not None else round(thickness, 3),
        "in_plane": {"downsample": round(factor, 3)} if resample else {"blur_sigma_px": round(sigma, 3)},
        "bias_std": round(bias_std, 4),
        "snr": round(snr, 2),
        "gamma": round(gamma, 4),
        "fov_zoom": round(zoom, 4),
        "fov_offset": offset.round(4).tolist(),
        "_bias": bias,
    }
    return params, rng


def _thick_slices(volume: np.ndarray, axis: int, indices: np.ndarray, thickness_mm: float) -> np.ndarray:
    """Slices at ``indices`` averaged over a slab ``thickness_mm`` thick (fractional box kernel)."""
    width = max(thickness_mm / VOXEL_MM, 1.0)
    half = int(math.ceil((width - 1) / 2))
    offsets = np.arange(-half, half + 1)
    weights = np.clip((width - np.abs(offsets) * 2 + 1) / 2, 0.0, 1.0)  # edge voxels count partly
    weights /= weights.sum()
    n = volume.shape[axis]
    out = 0.0
    for off, w in zip(offsets, weights, strict=True):
        out = out + w * np.take(volume, np.clip(indices + off, 0, n - 1), axis=axis)
    return np.moveaxis(np.asarray(out, np.float32), axis, 0)


def _bias_at(coarse: np.ndarray, shape: tuple[int, ...], axis: int, indices: np.ndarray) -> np.ndarray:
    """exp(smooth field) on the slices ``indices`` only, as (len(indices), in-plane...): cubic on a
    12^3 grid, then linear, which is smooth enough and far cheaper than cubic everywhere."""
    small = ndi.zoom(coarse, 3, order=3, mode="nearest")
    positions = [np.linspace(0, small.shape[a] - 1, shape[a]) for a in range(3)]
    positions[axis] = positions[axis][indices]
    return np.moveaxis(np.exp(_interp(small, positions)), axis, 0)


def _apply_bias(stack: np.ndarray, subject: _Subject, params: dict, axis: int, indices: np.ndarray):
    """Multiply the signal above the background level (air has no signal for the coil to shade)."""
    bias = _bias_at(params["_bias"], subject.image.shape, axis, indices)
    return (stack - subject.background) * bias + subject.background


def _in_plane(stack: np.ndarray, params: dict) -> np.ndarray:
    """In-plane resolution loss: down/up-sampling or a Gaussian blur (no blur across slices)."""
    if "downsample" in params["in_plane"]:
        factor = params["in_plane"]["downsample"]
        if factor > 1.05:
            h, w = stack.shape[1:]
            small_shape = (max(4, round(h / factor)), max(4, round(w / factor)))
            blurred = ndi.gaussian_filter(stack, (0, 0.4 * factor, 0.4 * factor))
            small = np.stack([_resize(s, small_shape) for s in blurred])
            return np.stack([_resize(s, (h, w)) for s in small])
        return stack
    sigma = params["in_plane"]["blur_sigma_px"]
    return ndi.gaussian_filter(stack, (0, sigma, sigma)) if sigma > 0.05 else stack


def _fit_fov(stack: np.ndarray, size: tuple[int, int], params: dict, cval: float) -> np.ndarray:
    """Square pixels, long side to ``size`` times the drawn zoom, shifted by the drawn offset."""
    h, w = stack.shape[1:]
    scale = min(size[0] / h, size[1] / w) * params["fov_zoom"]
    if scale < 1.0:  # anti-alias before shrinking
        stack = ndi.gaussian_filter(stack, (0, 0.4 / scale, 0.4 / scale))
    off = np.array(params["fov_offset"]) * np.array(size)
    rows = ((np.arange(size[0]) - (size[0] - 1) / 2 - off[0]) / scale + (h - 1) / 2).astype(np.float32)
    cols = ((np.arange(size[1]) - (size[1] - 1) / 2 - off[1]) / scale + (w - 1) / 2).astype(np.float32)
    r, c = np.meshgrid(rows, cols, indexing="ij")
    out = np.empty((len(stack), *size), np.float32)
    for i, s in enumerate(stack):
        out[i] = ndi.map_coordinates(s, (r, c), order=1, mode="constant", cval=cval)
    return out


def _finish(
    stack: np.ndarray, subject: _Subject, params: dict, rng: np.random.Generator, brain: np.ndarray
) -> np.ndarray:
    """Rician noise, intensity scale and gamma; guarantees finite, non-constant images."""
    inside = stack[brain > 0.5]
    level = float(inside.mean()) if inside.size else subject.reference
    sigma = max(abs(level), 0.05 * subject.reference) / params["snr"]
    real = stack + rng.standard_normal(stack.shape, dtype=np.float32) * sigma
    imag = rng.standard_normal(stack.shape, dtype=np.float32) * sigma
    out = np.sqrt(real * real + imag * imag) / subject.reference
    out = np.power(np.clip(out, 0.0, 4.0), params["gamma"]).astype(np.float32)
    return np.nan_to_num(out, nan=0.0, posinf=4.0, neginf=0.0)


def _public(params: dict) -> dict:
    return {k: v for k, v in params.items() if not k.startswith("_")}


def synthetic_volume(seed: int) -> tuple[np.ndarray, dict]:
    """One pseudo-subject as a float32 volume on the 1.5 mm RAS grid, acquired along a drawn axis.

    Includes every effect except the 2D field of view (thickness, in-plane blur and bias act
    relative to the drawn slicing axis). Returns the volume and the parameters drawn.
    """
    subject = _subject(int(seed))
    axis = int(np.random.default_rng(derived_seed(seed, 2)).integers(3))
    params, rng = _acquisition_params(int(seed), axis, None)
    n = subject.image.shape[axis]
    indices = np.arange(n)
    stack = _thick_slices(subject.image, axis, indices, params["thickness_mm"])
    stack = _apply_bias(stack, subject, params, axis, indices)
    stack = _in_plane(stack, params)
    brain = np.moveaxis(subject.brain, axis, 0)
    volume = np.moveaxis(_finish(stack, subject, params, rng, brain), 0, axis)
    return np.ascontiguousarray(volume), copy.deepcopy({**subject.params, "acquisition": _public(params)})


def _runs(rng: np.random.Generator, count: int, lo: int, hi: int) -> list[np.ndarray]:
    """Split ``count`` slices into runs of 8-16 consecutive indices spread over [lo, hi]."""
    lengths = []
    left = count
    while left > 0:
        length = min(left, int(rng.integers(RUN_LENGTH[0], RUN_LENGTH[1] + 1)))
        if left - length == 1:
            length = left  # never leave a one-slice run: it has no neighbour
        lengths.append(length)
        left -= length
    span = hi - lo + 1
    segment = span / len(lengths)
    runs = []
    for k, length in enumerate(lengths):
        start_lo = lo + int(k * segment)
        start_hi = max(start_lo, lo + int((k + 1) * segment) - length)
        start = int(rng.integers(start_lo, start_hi + 1))
        start = min(max(start, lo), max(lo, hi - length + 1))
        runs.append(np.arange(start, start + length))
    return runs


def synthetic_slices(
    seed: int,
    count: int,
    *,
    size: tuple[int, int] = (128, 128),
    axes=(0, 1, 2),
    slab_mm: float | None = None,
    contrast: str = "random",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` 2D slices of pseudo-subject ``seed``: (images (count, H, W) float32, axis, index).

    Layout: ``count`` is split evenly over ``axes`` (remainder to the first ones), in the order
    given. Along each axis the slices come in runs of 8-16 consecutive indices (ascending; a run
    is shorter only when fewer slices are asked for), runs in ascending order and spread over the
    brain (slices whose brain cross-section is under 30% of the largest are never used). So
    images[i] and images[i + 1] are neighbouring slices (1.5 mm apart) exactly when their axis is
    equal and their index differs by 1. Runs may overlap only when more slices are asked for than
    the brain spans. Each axis is its own acquisition (thickness, blur, bias, noise, field of view,
    shared by all its slices). ``slab_mm`` fixes the slice thickness instead of drawing 1-7 mm.
    Slices are rotated like ``data/build_training_slices.py`` (np.rot90 of the RAS slice).
    """
    if count < 0:
        raise ValueError("count must be non-negative")
    subject = _subject(int(seed), contrast)
    axes = tuple(int(a) for a in axes)
    per_axis = [count // len(axes) + (1 if k < count % len(axes) else 0) for k in range(len(axes))]
    images, axis_of, index_of = [], [], []
    for axis, n in zip(axes, per_axis, strict=True):
        if n == 0:
            continue
        params, rng = _acquisition_params(int(seed), axis, slab_mm)
        area = (subject.brain > 0.5).sum(axis=tuple(a for a in range(3) if a != axis))
        valid = np.flatnonzero(area >= MIN_BRAIN_FRACTION * area.max())
        indices = np.concatenate(_runs(rng, n, int(valid[0]), int(valid[-1])))
        stack = _thick_slices(subject.image, axis, indices, params["thickness_mm"])
        stack = _apply_bias(stack, subject, params, axis, indices)
        stack = _in_plane(stack, params)
        stack = np.rot90(stack, axes=(1, 2))
        brain = np.rot90(np.moveaxis(np.take(subject.brain, indices, axis=axis), axis, 0), axes=(1, 2))
        stack = _fit_fov(stack, size, params, subject.background)
        brain = _fit_fov(brain, size, params, 0.0)
        images.append(_finish(stack, subject, params, rng, brain))
        axis_of.append(np.full(n, axis, np.int64))
        index_of.append(indices.astype(np.int64))
    if not images:
        return np.zeros((0, *size), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(images), np.concatenate(axis_of), np.concatenate(index_of)


def subject_seed(seed: int, subject: int) -> int:
    """The seed of pseudo-subject number ``subject`` in a run seeded with ``seed``."""
    return derived_seed(seed, 7, subject)


def synthetic_subjects(
    n_subjects: int,
    slices_per_subject: int,
    *,
    seed: int = 0,
    size: tuple[int, int] = (128, 128),
    contrast: str = "random",
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Stacked slices of ``n_subjects`` pseudo-subjects, with a group name and slice index per image.

    Groups are "synth-0007/axis2" (subject number / slicing axis); split train and validation by
    subject (the part before "/") so no pseudo-subject lands on both sides.
    """
    images, groups, indices = [], [], []
    for k in range(n_subjects):
        stack, axis, index = synthetic_slices(
            subject_seed(seed, k), slices_per_subject, size=size, contrast=contrast
        )
        images.append(stack)
        groups.extend(f"synth-{k:04d}/axis{a}" for a in axis)
        indices.append(index)
    if not images:
        return np.zeros((0, *size), np.float32), [], np.zeros(0, np.int64)
    return np.concatenate(images), groups, np.concatenate(indices)
