"""Finding, reading and validating images: PNG/JPEG/TIFF/BMP, .npy, NIfTI and DICOM.

An :class:`ImageSet` indexes its inputs once (reading each file to validate it and to learn
its shape) and afterwards reads images lazily in order, so a folder of any size is never held
in memory at once. What indexing decoded is kept, up to a byte budget (:class:`DecodedPixels`),
so a scan does not decode a file again for embedding and registration. Every image has a stable
key: its path relative to the root folder without the extension, plus ``#<index>`` for a slice
of a volume, a frame or a stacked ``.npy``.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.io.normalise import LUMA_WEIGHTS, check_finite_and_varying, fit_to_size, to_gray
from deepssim.io.orientation import note_mixed_geometry, plane_axis, resample, to_canonical
from deepssim.progress import progress_iter
from deepssim.registry import Registry

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
# The reader registry: file suffix -> function(path, options) returning a 2D image or an
# (N, H, W) stack of float64. A new format is one function with @READERS.register(".suffix").
READERS: Registry[Callable[[Path, LoadOptions], np.ndarray]] = Registry("image format")


# A volume slice is "near-empty" when fewer than `min_foreground` of its pixels are brighter
# than this fraction of the volume's 99.5th-percentile intensity (above the volume minimum).
FOREGROUND_LEVEL = 0.1


@dataclass(frozen=True)
class LoadOptions:
    """How files become 2D images. Defaults suit axial slices of brain MRI.

    plane: the anatomical plane NIfTI volumes are sliced in (axial, coronal or sagittal), after
    reading each volume into nibabel's closest canonical orientation (RAS+; see
    :mod:`deepssim.io.orientation`).
    axis: legacy: slice along this voxel axis as stored (0, 1 or 2), without reorientation; None
    (default) slices by ``plane``.
    spacing: resample every NIfTI volume to this voxel size in mm (x, y, z canonical), trilinear.
    slice_range: (start, stop) of slice indices to keep from each volume, Python-style.
    min_foreground: skip volume slices with less foreground than this fraction (0 keeps all).
    size: (H, W) every image is brought to; None requires all images to share one shape.
    fit: "pad" (centre pad/crop) or "resize" (bilinear), used with ``size``.
    skip_bad: warn about and skip unreadable/constant/non-finite images instead of failing.
    """

    axis: int | None = None
    plane: str = "axial"
    spacing: tuple[float, float, float] | None = None
    slice_range: tuple[int | None, int | None] | None = None
    min_foreground: float = 0.05
    size: tuple[int, int] | None = None
    fit: str = "pad"
    skip_bad: bool = False


# Bytes of decoded pixels an indexed set keeps (per set), in the smallest type that holds them exactly:
# 8-bit 136 x 112 images are 15 KB each, so the paper's 65,850 generated images fit.
KEEP_DECODED_BYTES = 1 << 30


class DecodedPixels:
    """Images decoded while indexing, kept for later reads up to ``budget`` bytes (the first ones
    indexed; later ones are decoded again when read). Each is stored in the smallest of uint8,
    uint16, int16 and float32 that holds its values exactly (float64 otherwise), so a read gives
    back the decoded values bit for bit. Not pickled: a worker process reads the files itself."""

    def __init__(self, budget: int = KEEP_DECODED_BYTES) -> None:
        self.budget, self.used = int(budget), 0
        self.pixels: dict[ImageRef, np.ndarray] = {}

    def keep(self, ref: ImageRef, compact: np.ndarray) -> None:
        """Keep ``compact`` (from :func:`_compact`) as the pixels of ``ref`` if the budget allows."""
        if self.used + compact.nbytes <= self.budget:
            self.pixels[ref] = compact
            self.used += compact.nbytes

    def get(self, ref: ImageRef) -> np.ndarray | None:
        return self.pixels.get(ref)

    def __reduce__(self):
        return DecodedPixels, (0,)  # an empty store: the files are read where this arrives


def _compact(image: np.ndarray) -> np.ndarray:
    """``image`` in the smallest type that represents every value of it exactly."""
    low, high = float(image.min()), float(image.max())
    for kind in (np.uint8, np.uint16, np.int16):
        if np.iinfo(kind).min <= low and high <= np.iinfo(kind).max:
            converted = image.astype(kind)
            if np.array_equal(converted, image):
                return converted
            break  # not whole numbers: no integer type holds them
    if max(-low, high) < np.finfo(np.float32).max:
        converted = image.astype(np.float32)
        if np.array_equal(converted, image):
            return converted
    return image.copy()  # (not a view that would keep a whole volume alive)


@dataclass(frozen=True)
class ImageRef:
    """Where one 2D image lives: a file and, for multi-image files, the index inside it."""

    key: str
    path: Path
    index: int | None = None


@dataclass
class ImageSet:
    """An indexed, validated, lazily read collection of 2D images of one shape."""

    refs: list[ImageRef]
    shape: tuple[int, int]
    options: LoadOptions = field(default_factory=LoadOptions)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    decoded: DecodedPixels | None = field(default=None, repr=False, compare=False)

    @property
    def keys(self) -> list[str]:
        return [ref.key for ref in self.refs]

    def __len__(self) -> int:
        return len(self.refs)

    @classmethod
    def from_paths(
        cls,
        inputs: str | Path | Sequence[str | Path],
        options: LoadOptions | None = None,
        progress: bool = False,
        description: str = "indexing images",
        keep_bytes: int = KEEP_DECODED_BYTES,
    ) -> ImageSet:
        """Index a folder (recursively), a file, or a list of files and folders; the decoded
        images are kept for later reads up to ``keep_bytes`` (0: read the files again)."""
        options = options or LoadOptions()
        decoded = DecodedPixels(keep_bytes)
        files = list(_discover(inputs))
        if options.axis is None:  # one line when the volumes mix orientations or voxel sizes
            note_mixed_geometry([p for _, p in files if _suffix(p) in NIFTI_SUFFIXES], options.spacing)
        refs: list[ImageRef] = []
        shapes: Counter = Counter()
        example_of_shape: dict[tuple[int, int], str] = {}
        skipped: list[tuple[str, str]] = []
        indexed = _index_files(files, options)
        for path, found in progress_iter(indexed, description, "file", progress, total=len(files)):
            if isinstance(found, DeepSSIMError):
                if not options.skip_bad:
                    raise found
                skipped.append((str(path), str(found)))
                warnings.warn(f"skipping: {found}", stacklevel=2)
                continue
            for ref, image, image_shape, problem in found:
                if problem is not None:
                    if not options.skip_bad:
                        raise DeepSSIMError(problem)
                    skipped.append((ref.key, problem))
                    warnings.warn(f"skipping: {problem}", stacklevel=2)
                    continue
                decoded.keep(ref, image)
                refs.append(ref)
                shapes[image_shape] += 1
                example_of_shape.setdefault(image_shape, str(ref.path))
        if not refs:
            where = ", ".join(str(p) for p in _as_list(inputs))
            raise DeepSSIMError(f"no usable images found in {where} (supported: {', '.join(READERS)})")
        _check_unique_keys(refs)
        if skipped:
            warnings.warn(f"skipped {len(skipped)} bad image(s) (--skip-bad)", stacklevel=2)
        shape = options.size or _single_shape(shapes, example_of_shape)
        return cls(refs=refs, shape=tuple(shape), options=options, skipped=skipped, decoded=decoded)

    @classmethod
    def coerce(
        cls,
        images,
        options: LoadOptions | None = None,
        progress: bool = False,
        description: str = "indexing images",
    ) -> ImageSet:
        """``images`` itself if it is an ImageSet, else the ImageSet of those paths."""
        if isinstance(images, ImageSet):
            return images
        return cls.from_paths(images, options, progress, description)

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Images ``start:stop`` as an (n, H, W) float64 array of raw intensities."""
        refs = self.refs[start:stop]
        out = np.empty((len(refs), *self.shape), dtype=np.float64)
        cache: dict[Path, np.ndarray] = {}
        for row, ref in enumerate(refs):
            kept = None if self.decoded is None else self.decoded.get(ref)
            if kept is not None:  # (fitted in float64, as a decoded image is; else cast as it is copied)
                out[row] = kept if self.options.size is None else self._fit(kept.astype(np.float64))
                continue
            if ref.path not in cache:
                cache.clear()
                cache[ref.path] = _decode(ref.path, self.options)
            data = cache[ref.path]
            image = data if ref.index is None else data[ref.index]
            out[row] = self._fit(image)
        return out

    def subset(self, indices) -> ImageSet:
        """The set of the images at ``indices`` (any order, repeats allowed); nothing is read."""
        refs = [self.refs[i] for i in indices]
        return ImageSet(refs=refs, shape=self.shape, options=self.options, decoded=self.decoded)

    def take(self, indices) -> np.ndarray:
        """The images at ``indices`` (any order, repeats allowed), read lazily from their files."""
        return self.subset(indices).read()

    def batches(self, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, images) blocks of at most ``batch_size`` images, in order."""
        for start in range(0, len(self), batch_size):
            yield start, self.read(start, start + batch_size)

    def _fit(self, image: np.ndarray) -> np.ndarray:
        if self.options.size is None:
            return image
        return fit_to_size(image, self.options.size, self.options.fit)


def load_images(
    inputs: str | Path | Sequence[str | Path], options: LoadOptions | None = None
) -> tuple[list[str], np.ndarray]:
    """Read every image at once: (keys, (N, H, W) float64). For small sets and notebooks."""
    image_set = ImageSet.from_paths(inputs, options)
    return image_set.keys, image_set.read()


def _as_list(inputs) -> list[Path]:
    if isinstance(inputs, str | Path):
        return [Path(inputs)]
    return [Path(p) for p in inputs]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _is_dicom_without_suffix(path: Path) -> bool:
    if path.suffix:
        return False
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _is_supported(path: Path) -> bool:
    return _suffix(path) in READERS or _is_dicom_without_suffix(path)


def _discover(inputs) -> Iterator[tuple[Path, Path]]:
    """Yield (root, file) for every supported file; unsupported files in folders are ignored."""
    for item in _as_list(inputs):
        if item.is_dir():
            files = sorted(
                p
                for p in item.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(item).parts)
            )
            supported = [p for p in files if _is_supported(p)]
            if not supported:
                other = sorted({p.suffix or "(none)" for p in files})
                detail = f" (found only: {', '.join(other)})" if other else " (the folder is empty)"
                raise DeepSSIMError(f"{item}: no supported images{detail}")
            for path in supported:
                yield item, path
        elif item.is_file():
            if not _is_supported(item):
                raise DeepSSIMError(
                    f"{item}: unsupported file type {_suffix(item) or '(no extension)'}; "
                    f"supported: {', '.join(READERS)} and DICOM"
                )
            yield item.parent, item
        else:
            raise DeepSSIMError(f"{item}: no such file or folder")


def _key(root: Path, path: Path) -> str:
    relative = path.relative_to(root).as_posix()
    suffix = _suffix(path)
    return relative[: -len(suffix)] if suffix and relative.lower().endswith(suffix) else relative


# From this many files on, indexing decodes them in forked worker processes, one per core (Pillow's
# PNG decoder holds the GIL, so threads do not help; a fork shares what is already imported, and
# the images come back in their smallest exact type): 1.56x on 2 cores for 6,585 PNG files.
PARALLEL_INDEXING_FROM = 512
_FILES_PER_TASK = 64


def _index_files(files: list[tuple[Path, Path]], options: LoadOptions):
    """(path, what :func:`_index_file` found in it, or its DeepSSIMError) for each file, in order,
    the images compacted (:func:`_compact`)."""
    workers = _indexing_workers(len(files))
    if workers < 2:
        for root, path in files:
            yield path, _index_compact(root, path, options)
        return
    parts = [files[start : start + _FILES_PER_TASK] for start in range(0, len(files), _FILES_PER_TASK)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        results = pool.imap(functools.partial(_index_part, options=options), parts)
        for part, found in zip(parts, results, strict=True):
            yield from ((path, result) for (_, path), result in zip(part, found, strict=True))


def _indexing_workers(files: int) -> int:
    """Worker processes for indexing ``files`` files: the cores this process may use, where forking
    is safe (Linux, and not in a Ray driver: gRPC's threads do not survive a fork) and there are
    enough files to repay starting them; else 0."""
    if files < PARALLEL_INDEXING_FROM or sys.platform != "linux":
        return 0
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        return 0
    return len(os.sched_getaffinity(0))


def _index_part(part: list[tuple[Path, Path]], options: LoadOptions) -> list:
    return [_index_compact(root, path, options) for root, path in part]


def _index_compact(root: Path, path: Path, options: LoadOptions):
    """:func:`_index_file` with each good image compacted, or the DeepSSIMError it raised."""
    try:
        found = _index_file(root, path, options)
    except DeepSSIMError as error:
        return error
    return [
        (ref, image if problem else _compact(image), shape, problem) for ref, image, shape, problem in found
    ]


def _index_file(root: Path, path: Path, options: LoadOptions):
    """Read one file; return [(ref, decoded image, its shape once fitted, problem-or-None)] for each
    image it holds."""
    data = _decode(path, options)
    key = _key(root, path)
    if data.ndim == 2:
        items = [(ImageRef(key, path), data)]
    else:
        indices = _kept_slices(data, path, options)
        items = [(ImageRef(f"{key}#{i}", path, i), data[i]) for i in indices]
    found = []
    for ref, raw in items:
        image = raw
        if options.size is not None:
            image = fit_to_size(image, options.size, options.fit)
        problem = None
        if min(image.shape) < 7:
            problem = (
                f"{ref.key} ({path}): image is {image.shape[0]}x{image.shape[1]}; SSIM needs at least 7x7"
            )
        else:
            try:
                check_finite_and_varying(image, f"{ref.key} ({path})")
            except DeepSSIMError as error:
                problem = str(error)
        found.append((ref, raw, image.shape, problem))
    return found


def _kept_slices(stack: np.ndarray, path: Path, options: LoadOptions) -> list[int]:
    """Slice indices of a stack (slice axis first) after the slice range and empty-slice rule."""
    indices = range(stack.shape[0])
    if options.slice_range is not None:
        indices = indices[slice(*options.slice_range)]
        if not indices:
            start, stop = ("" if bound is None else bound for bound in options.slice_range)
            raise DeepSSIMError(
                f"{path}: --slices {start}:{stop} keeps no slice: it has {stack.shape[0]} slices "
                f"(0 to {stack.shape[0] - 1}) along the slicing axis"
            )
    indices = list(indices)
    if _suffix(path) in NIFTI_SUFFIXES and options.min_foreground > 0:
        shifted = stack - stack.min()
        level = FOREGROUND_LEVEL * np.percentile(shifted, 99.5)
        foreground = (shifted > level).mean(axis=(1, 2))
        indices = [i for i in indices if foreground[i] >= options.min_foreground]
    return indices


def _decode(path: Path, options: LoadOptions) -> np.ndarray:
    """Gray pixel data of a file as float64: a 2D image or a stack (n, H, W)."""
    try:
        size = path.stat().st_size
    except OSError as error:
        raise DeepSSIMError(f"{path}: cannot open ({error.strerror})") from None
    if size == 0:
        raise DeepSSIMError(f"{path}: file is empty (0 bytes); remove it or use --skip-bad")
    read = READERS.get(_suffix(path), _read_dicom)  # files without a suffix are DICOM (checked)
    try:
        return read(path, options)
    except DeepSSIMError:
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure is a bad file for the user
        raise DeepSSIMError(
            f"{path}: cannot read this file ({type(error).__name__}: {error}); "
            "check that it is not corrupt, or use --skip-bad"
        ) from None


@READERS.register(*RASTER_SUFFIXES)
def _read_raster(path: Path, options: LoadOptions) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            image = image.convert("RGB")
        elif image.mode == "LA":
            image = image.getchannel("L")
        elif image.mode == "1":
            image = image.convert("L")
        return to_gray(np.asarray(image))


@READERS.register(".npy")
def _read_npy(path: Path, options: LoadOptions) -> np.ndarray:
    data = np.load(path, allow_pickle=False)
    if data.ndim not in (2, 3):
        raise DeepSSIMError(f"{path}: .npy must hold a 2D image or an (N, H, W) stack; got {data.shape}")
    return data.astype(np.float64)


@READERS.register(*NIFTI_SUFFIXES)
def _read_nifti(path: Path, options: LoadOptions) -> np.ndarray:
    import nibabel as nib

    image = nib.load(path)
    volume = np.asarray(image.get_fdata(dtype=np.float64))
    while volume.ndim > 3 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim == 2:
        return volume
    if volume.ndim != 3:
        raise DeepSSIMError(f"{path}: expected a 3D volume, got shape {volume.shape}; split 4D series first")
    if options.axis is not None:  # legacy: a voxel axis as stored
        if options.axis not in (0, 1, 2):
            raise DeepSSIMError(f"--axis must be 0, 1 or 2; got {options.axis}")
        return np.moveaxis(volume, options.axis, 0)
    volume, zooms, _ = to_canonical(volume, image.affine, image.header.get_zooms()[:3])
    if options.spacing is not None:
        volume, _ = resample(volume, zooms, options.spacing)
    return np.moveaxis(volume, plane_axis(options.plane), 0)


@READERS.register(*DICOM_SUFFIXES)
def _read_dicom(path: Path, options: LoadOptions) -> np.ndarray:
    import pydicom

    dataset = pydicom.dcmread(path)
    pixels = dicom_pixels(dataset)
    if is_monochrome1(dataset):
        pixels = pixels.max() - pixels  # MONOCHROME1 stores inverted gray levels
    return pixels


def dicom_pixels(dataset) -> np.ndarray:
    """A DICOM dataset's pixels as float64 with rescale slope and intercept applied and colour made
    gray; MONOCHROME1 is not yet inverted (the caller inverts over an image or a whole volume)."""
    pixels = dataset.pixel_array.astype(np.float64)
    slope = float(getattr(dataset, "RescaleSlope", 1) or 1)
    intercept = float(getattr(dataset, "RescaleIntercept", 0) or 0)
    pixels = pixels * slope + intercept
    if int(getattr(dataset, "SamplesPerPixel", 1) or 1) > 1:
        pixels = pixels[..., :3] @ LUMA_WEIGHTS  # colour (frames, H, W, 3) or (H, W, 3)
    return pixels


def is_monochrome1(dataset) -> bool:
    """Whether the dataset stores inverted gray levels (MONOCHROME1)."""
    return getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1"


def is_dicom_file(path: Path) -> bool:
    """A DICOM file by its suffix (.dcm, .dicom), or a file without suffix with the DICM preamble."""
    return path.suffix.lower() in DICOM_SUFFIXES or _is_dicom_without_suffix(path)


def _check_unique_keys(refs: list[ImageRef]) -> None:
    seen: dict[str, Path] = {}
    for ref in refs:
        if ref.key in seen:
            raise DeepSSIMError(
                f"two files give the same key {ref.key!r}: {seen[ref.key]} and {ref.path}; rename one of them"
            )
        seen[ref.key] = ref.path


def _single_shape(shapes: Counter, example_of_shape: dict) -> tuple[int, int]:
    if len(shapes) == 1:
        return next(iter(shapes))
    listing = "; ".join(
        f"{h}x{w}: {count} image(s), e.g. {example_of_shape[(h, w)]}"
        for (h, w), count in shapes.most_common()
    )
    raise DeepSSIMError(
        f"images have different shapes ({listing}); pass --size HxW to bring them to one shape"
    )


def image_batches(images, batch_size: int) -> Iterator[np.ndarray]:
    """Batches of same-shaped 2D images, in order (a new batch starts where the shape changes)."""
    if hasattr(images, "read"):  # an ImageSet, read lazily
        for start in range(0, len(images), batch_size):
            yield images.read(start, start + batch_size)
        return
    if isinstance(images, np.ndarray):
        images = images[None] if images.ndim == 2 else images
        if images.ndim != 3:
            raise DeepSSIMError(f"expected 2D images or an (N, H, W) array, got shape {images.shape}")
    batch: list[np.ndarray] = []
    for image in images:
        image = np.asarray(image)
        if image.ndim != 2:
            raise DeepSSIMError(f"expected 2D images, got an array of shape {image.shape}")
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield np.stack(batch)
