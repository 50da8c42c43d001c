"""Reading every supported format, keys, size handling and clear errors for bad input."""

from __future__ import annotations

import os
import pickle
import sys
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from deepssim import DeepSSIMError, ImageSet, LoadOptions, load_images
from deepssim.io.normalise import fit_to_size
from tests.helpers import SOURCES, smooth_image, write_dicom


def test_every_format_is_read_with_stable_keys(mixed_folder):
    keys, images = load_images(mixed_folder)
    assert keys == ["alpha", "array", "bitmap", "colour", "gray8", "page", "scan", "sub/gray16"]
    assert images.shape == (8, 32, 28) and images.dtype == np.float64
    by_key = dict(zip(keys, images, strict=True))
    gray8 = np.asarray(Image.open(mixed_folder / "gray8.png"), dtype=np.float64)
    np.testing.assert_array_equal(by_key["gray8"], gray8)
    np.testing.assert_array_equal(by_key["page"], gray8)
    np.testing.assert_array_equal(by_key["bitmap"], gray8)
    # 16-bit PNG keeps its 16-bit values
    assert by_key["sub/gray16"].max() > 255
    # RGB(A) becomes ITU-R 601 luma, the same as PIL's own "L" conversion (to within rounding)
    pil_luma = np.asarray(Image.open(mixed_folder / "alpha.png").convert("L"), dtype=np.float64)
    assert np.abs(by_key["alpha"] - pil_luma).max() <= 1.0
    np.testing.assert_array_equal(by_key["array"], np.load(mixed_folder / "array.npy"))


def test_dicom_rescale_and_multiframe(tmp_path, rng):
    stored = (rng.uniform(0, 4000, size=(3, 16, 12))).astype(np.uint16)
    write_dicom(tmp_path / "single.dcm", stored[0], slope=2.0, intercept=-100)
    write_dicom(tmp_path / "frames.dcm", stored, slope=0.5, intercept=10)
    write_dicom(tmp_path / "series_no_extension", stored[1])
    write_dicom(tmp_path / "inverted.dcm", stored[2], photometric="MONOCHROME1")
    keys, images = load_images(tmp_path)
    by_key = dict(zip(keys, images, strict=True))
    assert sorted(keys) == ["frames#0", "frames#1", "frames#2", "inverted", "series_no_extension", "single"]
    np.testing.assert_allclose(by_key["single"], stored[0] * 2.0 - 100)
    np.testing.assert_allclose(by_key["frames#2"], stored[2] * 0.5 + 10)
    np.testing.assert_allclose(by_key["series_no_extension"], stored[1])
    np.testing.assert_allclose(by_key["inverted"], stored[2].max() - stored[2].astype(float))


def test_nifti_slices_axis_range_and_empty_rule(tmp_path, rng):
    volume = np.zeros((20, 18, 10))
    volume[2:18, 3:15, 2:8] = rng.uniform(50, 100, size=(16, 12, 6))  # slices 0,1,8,9 of axis 2 empty
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "vol.nii.gz")
    image_set = ImageSet.from_paths(tmp_path)
    assert image_set.keys == [f"vol#{z}" for z in range(2, 8)]
    assert image_set.shape == (20, 18)
    np.testing.assert_array_equal(image_set.read(0, 1)[0], volume[:, :, 2])
    ranged = ImageSet.from_paths(tmp_path, LoadOptions(slice_range=(3, 5)))
    assert ranged.keys == ["vol#3", "vol#4"]
    sagittal = ImageSet.from_paths(tmp_path, LoadOptions(axis=0))
    assert sagittal.shape == (18, 10) and sagittal.keys[0] == "vol#2"
    np.testing.assert_array_equal(sagittal.read(0, 1)[0], volume[2])


def test_bundled_volumes_load():
    """The train NIfTI sources (one has a trailing singleton 4th dimension) load as slices."""
    for name in ("S0_10slices.nii.gz", "anatomical.nii", "KmeansTest_T1UCharRaw.nii.gz"):
        image_set = ImageSet.from_paths(SOURCES / name)
        assert len(image_set) > 0
        assert np.isfinite(image_set.read(0, 2)).all()


def test_reading_is_lazy_and_batched(tmp_path, rng):
    for n in range(7):
        np.save(tmp_path / f"img{n}.npy", smooth_image(rng, (10, 9)))
    image_set = ImageSet.from_paths(tmp_path)
    batches = list(image_set.batches(3))
    assert [start for start, _ in batches] == [0, 3, 6]
    np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), image_set.read())


def test_indexing_keeps_decoded_pixels_exactly_and_within_budget(mixed_folder, tmp_path, rng):
    """A scan reads each image three times (index, embed, register): the indexed pixels are kept,
    bit for bit, up to the budget; files past it, and a pickled set, are read from disk again."""
    fresh = ImageSet.from_paths(mixed_folder, keep_bytes=0)
    kept = ImageSet.from_paths(mixed_folder)
    assert fresh.decoded.pixels == {} and len(kept.decoded.pixels) == len(kept)
    np.testing.assert_array_equal(kept.read(), fresh.read())  # every format, float64, bit for bit
    assert kept.decoded.get(kept.refs[kept.keys.index("gray8")]).dtype == np.uint8
    assert kept.decoded.get(kept.refs[kept.keys.index("sub/gray16")]).dtype == np.uint16
    assert kept.decoded.get(kept.refs[kept.keys.index("array")]).dtype == np.float64  # not float32-exact

    volume = rng.uniform(0.0, 1.0, size=(20, 18, 10)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "vol.nii.gz")
    slices = ImageSet.from_paths(tmp_path / "vol.nii.gz", LoadOptions(axis=2, min_foreground=0))
    stored = slices.decoded.get(slices.refs[0])
    assert stored.dtype == np.float32 and stored.base is None  # a copy, not a view of the volume
    resized = LoadOptions(axis=2, min_foreground=0, size=(15, 13), fit="resize")  # fitted in float64
    np.testing.assert_array_equal(
        ImageSet.from_paths(tmp_path / "vol.nii.gz", resized).read(),
        ImageSet.from_paths(tmp_path / "vol.nii.gz", resized, keep_bytes=0).read(),
    )
    (tmp_path / "vol.nii.gz").unlink()
    np.testing.assert_array_equal(slices.subset([3]).read()[0], volume[:, :, 3])  # from memory

    folder = tmp_path / "pngs"
    folder.mkdir()
    for n in range(4):
        Image.fromarray(rng.integers(0, 255, (12, 10), dtype=np.uint8)).save(folder / f"{n}.png")
    budgeted = ImageSet.from_paths(folder, keep_bytes=2 * 12 * 10)
    assert budgeted.decoded.used == 240 and [ref.key for ref in budgeted.decoded.pixels] == ["0", "1"]
    (folder / "3.png").unlink()
    budgeted.read(0, 2)  # kept
    with pytest.raises(DeepSSIMError, match="3.png"):  # past the budget: read from the file again
        budgeted.read(3, 4)
    assert pickle.loads(pickle.dumps(budgeted)).decoded.pixels == {}


def test_indexing_in_worker_processes_equals_indexing_here(tmp_path, rng, monkeypatch):
    """Many files are decoded by forked workers: the same keys, pixels, order, errors and skips."""
    from deepssim.io import load

    folder = tmp_path / "many"
    folder.mkdir()
    for n in range(11):
        Image.fromarray(rng.integers(0, 255, (12, 10), dtype=np.uint8)).save(folder / f"{n:02d}.png")
    np.save(folder / "07b.npy", smooth_image(rng, (12, 10)))
    here = ImageSet.from_paths(folder)
    monkeypatch.setattr(load, "_indexing_workers", lambda files: 2)
    monkeypatch.setattr(load, "_FILES_PER_TASK", 3)
    forked = ImageSet.from_paths(folder)
    assert forked.keys == here.keys and len(forked.decoded.pixels) == 12
    np.testing.assert_array_equal(forked.read(), here.read())
    (folder / "05.png").write_bytes(b"not a png")
    with pytest.raises(DeepSSIMError, match="05.png"):
        ImageSet.from_paths(folder)
    with pytest.warns(UserWarning, match="05.png"):
        skipping = ImageSet.from_paths(folder, LoadOptions(skip_bad=True))
    assert [key for key in here.keys if key != "05"] == skipping.keys
    assert [path for path, _ in skipping.skipped] == [str(folder / "05.png")]

    monkeypatch.undo()  # who forks: many files on Linux, not a Ray driver (gRPC's threads)
    assert load._indexing_workers(load.PARALLEL_INDEXING_FROM - 1) == 0
    if sys.platform == "linux":
        assert load._indexing_workers(load.PARALLEL_INDEXING_FROM) == len(os.sched_getaffinity(0))
        monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: True))
        assert load._indexing_workers(load.PARALLEL_INDEXING_FROM) == 0


def test_mixed_shapes_need_size(tmp_path, rng):
    np.save(tmp_path / "small.npy", smooth_image(rng, (10, 12)))
    np.save(tmp_path / "large.npy", smooth_image(rng, (16, 14)))
    with pytest.raises(DeepSSIMError, match=r"10x12.*small.npy.*--size|16x14.*--size"):
        ImageSet.from_paths(tmp_path)
    padded = ImageSet.from_paths(tmp_path, LoadOptions(size=(12, 12)))
    assert padded.read().shape == (2, 12, 12)
    resized = ImageSet.from_paths(tmp_path, LoadOptions(size=(12, 12), fit="resize"))
    assert resized.read().shape == (2, 12, 12)


def test_fit_to_size_pads_with_background_and_crops_centre():
    image = np.arange(12.0).reshape(3, 4) + 1
    padded = fit_to_size(image, (5, 6))
    np.testing.assert_array_equal(padded[1:4, 1:5], image)
    assert padded[0, 0] == image.min()
    np.testing.assert_array_equal(fit_to_size(image, (1, 2)), image[1:2, 1:3])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: (p / "empty.png").write_bytes(b""), "empty.png: file is empty"),
        (lambda p: (p / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage"), "broken.png: cannot read"),
        (lambda p: np.save(p / "flat.npy", np.full((9, 9), 3.0)), "flat.*constant"),
        (lambda p: np.save(p / "nan.npy", np.where(np.eye(9), np.nan, 1.0)), "nan.*NaN"),
        (lambda p: (p / "broken.nii.gz").write_bytes(b"not gzip"), "broken.nii.gz: cannot read"),
        (
            lambda p: (p / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\1" * 20),
            "broken.dcm: cannot read",
        ),
    ],
)
def test_bad_files_name_the_file_and_can_be_skipped(tmp_path, rng, make, message):
    np.save(tmp_path / "good.npy", smooth_image(rng, (9, 9)))
    make(tmp_path)
    with pytest.raises(DeepSSIMError, match=message):
        ImageSet.from_paths(tmp_path)
    with pytest.warns(UserWarning, match="skipp"):
        image_set = ImageSet.from_paths(tmp_path, LoadOptions(skip_bad=True))
    assert image_set.keys == ["good"] and len(image_set.skipped) == 1


def test_empty_folder_and_unsupported_files(tmp_path):
    with pytest.raises(DeepSSIMError, match="folder is empty"):
        ImageSet.from_paths(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DeepSSIMError, match=r"no supported images \(found only: .txt\)"):
        ImageSet.from_paths(tmp_path)
    with pytest.raises(DeepSSIMError, match="unsupported file type .txt"):
        ImageSet.from_paths(tmp_path / "notes.txt")
    with pytest.raises(DeepSSIMError, match="no such file"):
        ImageSet.from_paths(tmp_path / "missing")


def test_duplicate_keys_are_an_error(tmp_path, rng):
    np.save(tmp_path / "a.npy", smooth_image(rng, (9, 9)))
    Image.fromarray(np.uint8(smooth_image(rng, (9, 9)) % 255)).save(tmp_path / "a.png")
    with pytest.raises(DeepSSIMError, match="same key 'a'"):
        ImageSet.from_paths(tmp_path)
