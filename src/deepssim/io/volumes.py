"""Sets of whole 3D volumes for the volume scan (``deepssim scan --unit volume``).

Every volume is a NIfTI file, or a folder holding one DICOM series (:mod:`deepssim.io.dicom_series`,
its LPS coordinates converted to RAS), read in canonical (RAS+) orientation
(:mod:`deepssim.io.orientation`), resampled to ``spacing`` when given, and read one at a time: a set
holds paths and geometry, never the voxels, so memory stays bounded by the few volumes being
compared. Indexing reads headers only and refuses, before any work, what a volume comparison cannot
mean: 2D images, 4D series, voxel sizes that differ within or across the sets (without
``--spacing``) and grids of different shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepssim.errors import DeepSSIMError
from deepssim.io.dicom_series import read_series, series_files, series_geometry
from deepssim.io.load import is_dicom_file
from deepssim.io.orientation import canonical_axes, read_canonical, resampled_shape

VOLUME_SUFFIXES = (".nii", ".nii.gz")


def _is_volume_file(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def _key(root: Path | None, path: Path) -> str:
    if root is not None and path == root:  # the source folder is itself a series folder
        return path.name
    relative = path.relative_to(root).as_posix() if root is not None else path.name
    for suffix in VOLUME_SUFFIXES:
        if relative.lower().endswith(suffix):
            return relative[: -len(suffix)]
    return relative


@dataclass(frozen=True)
class VolumeSet:
    """Volumes of one role ("training" or "generated"): their keys (paths below the folder, no
    suffix; a DICOM series by its folder), files (or series folders), the canonical grid shape they
    share and their voxel size in mm."""

    keys: list[str]
    paths: list[Path]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    resample_to: tuple[float, float, float] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> np.ndarray:
        """Volume ``index`` in canonical orientation (float64), resampled if the set says so."""
        path = self.paths[index]
        if path.is_dir():
            volume = read_series(path, self.resample_to).data
        else:
            volume = read_canonical(path, self.resample_to).data
        if volume.shape != self.shape:  # the header promised otherwise: a corrupt or odd file
            raise DeepSSIMError(
                f"{self.paths[index]}: read as {_shape(volume.shape)}, its header says {_shape(self.shape)}"
            )
        return volume

    @classmethod
    def index(cls, sources, role: str, spacing: tuple[float, float, float] | None = None) -> VolumeSet:
        """The NIfTI volumes and DICOM series in ``sources`` (folders, searched recursively, or
        files; every folder whose files are DICOM is one series volume), checked from their
        headers: each 3D, one voxel size (unless ``spacing`` resamples them), one grid."""
        sources = [sources] if isinstance(sources, str | Path) else list(sources)
        found: list[tuple[Path | None, Path]] = []
        for source in map(Path, sources):
            if source.is_dir():
                files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
                if not files:
                    raise DeepSSIMError(f"{source}: no files in this {role} folder")
                # every folder holding DICOM files is one series volume, in place of its files
                series = {p.parent for p in files if p.name.upper() != "DICOMDIR" and is_dicom_file(p)}
                in_series = {p for folder in series for p in series_files(folder)}
                volumes = [p for p in files if p not in in_series and p.name.upper() != "DICOMDIR"]
                found += [(source, p) for p in sorted([*volumes, *series])]
            elif source.is_file():
                found.append((None, source))
            else:
                raise DeepSSIMError(f"{source}: no such file or folder (the {role} volumes)")
        not_volumes = [p for _, p in found if not (p.is_dir() or _is_volume_file(p))]
        if not_volumes:
            raise DeepSSIMError(
                f"{not_volumes[0]}: --unit volume compares whole 3D volumes (NIfTI .nii or .nii.gz, or "
                f"a folder holding one DICOM series); this is not one. Scan 2D images without --unit "
                f"volume, or keep only volumes in the {role} folder ({len(not_volumes)} such file(s))"
            )
        geometry = [_header_geometry(path, spacing) for _, path in found]
        spacings = {g[1] for g in geometry}
        if spacing is None and len(spacings) > 1:
            by_spacing = {g[1]: path for g, (_, path) in zip(geometry, found, strict=True)}
            first, second = list(by_spacing.items())[:2]
            raise DeepSSIMError(
                f"the {role} volumes have different voxel sizes ({first[1]}: {_mm(first[0])}, "
                f"{second[1]}: {_mm(second[0])}); pass --spacing MM to resample all to one"
            )
        shapes = {g[0] for g in geometry}
        if len(shapes) > 1:
            by_shape = {g[0]: path for g, (_, path) in zip(geometry, found, strict=True)}
            first, second = list(by_shape.items())[:2]
            raise DeepSSIMError(
                f"the {role} volumes lie on different grids ({first[1]}: {_shape(first[0])}, {second[1]}: "
                f"{_shape(second[0])} voxels in RAS order); 3D SSIM compares volumes of one grid: crop or "
                "pad them to one shape (after --spacing, if their voxel sizes differ)"
            )
        keys = [_key(root, path) for root, path in found]
        if len(set(keys)) < len(keys):
            duplicate = next(k for k in keys if keys.count(k) > 1)
            raise DeepSSIMError(f"two {role} volumes have the key {duplicate!r}; give them distinct names")
        return cls(keys, [p for _, p in found], geometry[0][0], geometry[0][1], spacing)

    def check_matches(self, other: VolumeSet) -> None:
        """Training and generated volumes must share grid and voxel size to be compared voxel by voxel."""
        if self.spacing != other.spacing and self.resample_to is None:
            raise DeepSSIMError(
                f"training volumes have {_mm(self.spacing)} voxels, generated ones {_mm(other.spacing)}; "
                "pass --spacing MM to resample both to one"
            )
        if self.shape != other.shape:
            raise DeepSSIMError(
                f"training volumes are {_shape(self.shape)} voxels, generated ones {_shape(other.shape)} "
                "(RAS order); 3D SSIM compares volumes of one grid: crop or pad them to one shape"
            )


def _header_geometry(path: Path, spacing) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """(canonical shape, voxel size in mm) from the header alone (of every slice, for a DICOM series
    folder); 2D and 4D files refused."""
    import nibabel as nib

    if path.is_dir():
        shape, zooms = series_geometry(path)
        return _resampled_geometry(shape, zooms, spacing)

    try:
        image = nib.load(path)
    except Exception as error:  # noqa: BLE001 - nibabel raises many types for unreadable files
        raise DeepSSIMError(f"{path}: not a readable NIfTI file ({error})") from None
    shape = list(image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    if len(shape) < 3 or min(shape) == 1:
        raise DeepSSIMError(
            f"{path}: a 2D image ({_shape(shape)}), not a volume; scan slices without --unit volume"
        )
    if len(shape) > 3:
        raise DeepSSIMError(
            f"{path}: a {len(shape)}D series ({_shape(shape)}); split it into 3D volumes first "
            "(e.g. nibabel.funcs.four_to_three or fslsplit)"
        )
    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    return _resampled_geometry(
        canonical_axes([int(n) for n in shape], image.affine), canonical_axes(zooms, image.affine), spacing
    )


def _resampled_geometry(canonical_shape, canonical_zooms, spacing):
    """The grid and voxel size a canonical volume has once read, resampled to ``spacing`` if given."""
    if spacing is not None:
        return resampled_shape(canonical_shape, canonical_zooms, spacing), tuple(float(s) for s in spacing)
    return tuple(canonical_shape), tuple(round(z, 4) for z in canonical_zooms)


def _shape(shape) -> str:
    return "x".join(str(int(n)) for n in shape)


def _mm(spacing) -> str:
    return "x".join(f"{float(s):g}" for s in spacing) + " mm"
