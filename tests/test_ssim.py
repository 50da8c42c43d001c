"""The SSIM engine against scikit-image, the independent reference."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import deepssim
from deepssim.ssim import engine
from deepssim.ssim.engine import _ssim_kernel
from tests.helpers import SOURCES, reference_ssim, smooth_image

BACKENDS = ["torch"] + (["c"] if _ssim_kernel is not None else [])
TOLERANCE = {np.float64: 1e-5, np.float32: 1e-4}


def reference_matrix(train: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """scikit-image with defaults under the paper's rule, in float64."""
    return np.array([[reference_ssim(a, b) for b in generated] for a in train])


def real_mri_slices(count: int, shape=(60, 52)) -> np.ndarray:
    import nibabel as nib

    volume = np.asarray(nib.load(SOURCES / "KmeansTest_T1UCharRaw.nii.gz").get_fdata())
    return np.stack([volume[30 : 30 + shape[0], 20 : 20 + shape[1], z] for z in range(15, 15 + 3 * count, 3)])


def test_scikit_image_not_a_tautology():
    """Guard: the reference really is scikit-image's windowed SSIM, not a global formula that any
    implementation could match by accident; and the engine agrees with the windowed one."""
    rng = np.random.default_rng(0)
    a, b = smooth_image(rng), smooth_image(rng)
    za, zb = (a - a.mean()) / a.std(), (b - b.mean()) / b.std()
    c1, c2 = (0.01 * np.ptp(za)) ** 2, (0.03 * np.ptp(za)) ** 2
    covariance = np.mean(za * zb)  # both means are 0 and both variances 1 after z-scoring
    global_ssim = (c1 * (2 * covariance + c2)) / (c1 * (2 + c2))
    reference = reference_matrix(a[None], b[None])[0, 0]
    assert abs(reference - global_ssim) > 0.05
    assert deepssim.ssim(a, b) == pytest.approx(reference, abs=1e-12)
    assert deepssim.ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_the_fast_math_kernel_leaves_subnormal_floats_alone():
    """The kernel is built with -ffast-math, which may link code that flushes subnormals to zero
    for the whole process when the library loads; importing it must not change NumPy's results."""
    import subprocess
    import sys

    probe = (
        "import numpy as np\n"
        "import deepssim.ssim._kernel\n"
        "tiny = np.array([1e-40], dtype=np.float32)\n"
        "print(float((tiny * np.float32(1.0))[0]), float((np.array([5e-324]) * 1.0)[0]))\n"
    )
    if _ssim_kernel is None:
        pytest.skip("the C kernel is not built here")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    single, double = (float(v) for v in out.split())
    assert single == pytest.approx(1e-40, rel=1e-3) and double > 0


@pytest.mark.parametrize("backend", BACKENDS + ["numpy-prepare"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "case",
    ["random", "mri", "odd", "minimum", "flat_background", "tall_for_refresh", "many_generated"],
)
def test_matrix_matches_scikit_image(backend, dtype, case, monkeypatch):
    """Every backend; "numpy-prepare" is an install without the C kernel (statistics in NumPy)."""
    if backend == "numpy-prepare":
        monkeypatch.setattr(engine, "_ssim_kernel", None)
        backend = "torch"
    rng = np.random.default_rng(7)
    if case == "random":
        train, generated = rng.normal(size=(9, 24, 20)), rng.normal(size=(11, 24, 20))
    elif case == "mri":
        train = real_mri_slices(5)
        generated = np.concatenate([train[:3] + rng.normal(0, 5, train[:3].shape), real_mri_slices(7)[4:]])
    elif case == "odd":
        train = np.stack([smooth_image(rng, (23, 17)) for _ in range(10)])
        generated = np.stack([smooth_image(rng, (23, 17)) for _ in range(3)])
    elif case == "minimum":
        train, generated = rng.normal(size=(4, 7, 7)), rng.normal(size=(5, 7, 7))
    elif case == "flat_background":
        train = np.zeros((6, 40, 36))
        generated = np.zeros((5, 40, 36))
        train[:, 12:28, 10:24] = rng.normal(100, 20, size=(6, 16, 14))
        generated[:, 14:30, 8:22] = rng.normal(100, 20, size=(5, 16, 14))
    elif case == "many_generated":  # threads split generated blocks; the last has empty lanes
        train = np.stack([smooth_image(rng, (30, 41)) for _ in range(5)])
        generated = np.stack([smooth_image(rng, (30, 41)) for _ in range(37)])
    else:  # taller than the kernel's refresh interval, with large values
        train = 1000 + 300 * np.stack([smooth_image(rng, (70, 12)) for _ in range(9)])
        generated = 1000 + 300 * np.stack([smooth_image(rng, (70, 12)) for _ in range(9)])
    expected = reference_matrix(train, generated)
    got = deepssim.ssim_matrix(train, generated, dtype=dtype, backend=backend)
    assert got.shape == expected.shape and got.dtype == dtype
    assert np.abs(got - expected).max() <= TOLERANCE[dtype]
    pairs = min(len(train), len(generated))
    matched = deepssim.ssim_pairs(train[:pairs], generated[:pairs])
    np.testing.assert_allclose(matched, np.diag(expected[:pairs, :pairs]), atol=TOLERANCE[np.float64])


def test_single_pair_and_asymmetry():
    rng = np.random.default_rng(3)
    a = smooth_image(rng)
    b = 5 * a + rng.normal(0, 3, a.shape)
    b[0, 0] = 1e3  # an outlier changes b's data range, so ssim(a, b) != ssim(b, a)
    assert deepssim.ssim(a, b) == pytest.approx(reference_matrix(a[None], b[None])[0, 0], abs=1e-10)
    assert deepssim.ssim(b, a) == pytest.approx(reference_matrix(b[None], a[None])[0, 0], abs=1e-10)
    assert abs(deepssim.ssim(a, b) - deepssim.ssim(b, a)) > 1e-3


def test_blocks_stream_the_same_matrix():
    rng = np.random.default_rng(4)
    train, generated = rng.normal(size=(13, 16, 15)), rng.normal(size=(10, 16, 15))
    full = deepssim.ssim_matrix(train, generated, dtype=np.float64)
    assembled = np.full_like(full, np.nan)
    for r0, s0, block in engine.ssim_blocks(train, generated, np.float64, block_size=4, cache_bytes=0):
        assembled[r0 : r0 + block.shape[0], s0 : s0 + block.shape[1]] = block
    np.testing.assert_allclose(assembled, full, atol=1e-12)
    np.testing.assert_allclose(full, reference_matrix(train, generated), atol=1e-10)


def test_list_of_arrays_input():
    rng = np.random.default_rng(5)
    train = [smooth_image(rng, (12, 12)) for _ in range(3)]
    generated = [smooth_image(rng, (12, 12)) for _ in range(2)]
    got = deepssim.ssim_matrix(train, generated, dtype=np.float64)
    np.testing.assert_allclose(got, reference_matrix(np.stack(train), np.stack(generated)), atol=1e-10)


@pytest.mark.parametrize(
    "train, generated, message",
    [
        (np.ones((2, 10, 10)), np.random.default_rng(0).normal(size=(2, 10, 10)), "constant"),
        (np.random.default_rng(0).normal(size=(2, 10, 10)), np.ones((20, 10, 10)), "constant"),
        (np.random.default_rng(0).normal(size=(1, 6, 9)), np.zeros((1, 6, 9)), "at least 7x7"),
        (np.full((1, 10, 10), np.nan), np.zeros((1, 10, 10)), "NaN"),
        (
            np.random.default_rng(0).normal(size=(1, 10, 10)),
            np.random.default_rng(1).normal(size=(1, 10, 12)),
            "10x10",
        ),
    ],
)
def test_bad_arrays_give_clear_errors(train, generated, message):
    with pytest.raises(deepssim.DeepSSIMError, match=message):
        deepssim.ssim_matrix(train, generated)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("role", ["training", "generated"])
@pytest.mark.parametrize(
    "problem, message",
    [("nan", "contains NaN or Inf"), ("inf", "contains NaN or Inf"), ("constant", "is constant")],
)
def test_an_unpreparable_image_is_named(backend, role, problem, message):
    """The error names the image, counted across blocks (the C kernel finds these as it prepares)."""
    rng = np.random.default_rng(0)
    images = {"training": rng.normal(size=(5, 9, 9)), "generated": rng.normal(size=(40, 9, 9))}
    bad = {"nan": np.nan, "inf": np.inf, "constant": None}[problem]
    if bad is None:
        images[role][3] = 1.0
    else:
        images[role][3, 4, 4] = bad
    expected = message if _ssim_kernel is not None or problem == "constant" else "NaN or Inf"
    with pytest.raises(deepssim.DeepSSIMError, match=expected) as error:
        deepssim.ssim_matrix(images["training"], images["generated"], backend=backend, block_size=2)
    if _ssim_kernel is not None:
        assert f"{role} image 3 " in str(error.value)


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C compiler")
def test_c_kernel_is_built_where_a_compiler_exists():
    """Installation must have compiled the fast kernel; otherwise the CPU path is ~50x slower."""
    assert _ssim_kernel is not None


def test_matched_pairs_match_scikit_image(rng):
    train = real_mri_slices(5)
    generated = train[::-1] + rng.normal(0, 5, train.shape)
    expected = np.diag(reference_matrix(train, generated))
    np.testing.assert_allclose(deepssim.ssim_pairs(train, generated, chunk=2), expected, atol=1e-10)


@pytest.mark.parametrize("kernel", ["c", "none"])
def test_raw_indexed_pairs_match_scikit_image(rng, kernel, monkeypatch):
    """ssim_raw_pairs (registration's candidates, z-scored and summed in cache per pair)."""
    if kernel == "none":
        monkeypatch.setattr(engine, "_ssim_kernel", None)
    train = real_mri_slices(4)
    raw = np.concatenate([train[::-1] + rng.normal(0, 5, train.shape), train[:1] * 2.0])
    train_index, raw_index = np.array([0, 1, 2, 3, 0, 3, 2]), np.array([4, 0, 1, 2, 3, 3, 4])
    expected = [reference_ssim(train[i], raw[j]) for i, j in zip(train_index, raw_index, strict=True)]
    prepared = engine.TrainingStatistics.empty(6, *train.shape[1:])
    prepared.put([5, 1, 2, 0], train)  # rows of a larger store, in any order
    train_rows = np.array([5, 1, 2, 0])[train_index]
    scores = engine.ssim_raw_pairs(prepared, raw, train_rows, raw_index)
    np.testing.assert_allclose(scores, expected, atol=1e-10)
    stack = (raw_index >= 3).astype(int)  # the same images as two stacks
    split = engine.ssim_raw_pairs(prepared, [raw[:3], raw[3:]], train_rows, raw_index - 3 * stack, stack)
    np.testing.assert_allclose(split, expected, atol=1e-10)
    raw[2] = 7.0
    with pytest.raises(deepssim.DeepSSIMError, match="constant"):
        engine.ssim_raw_pairs(prepared, raw, train_rows, raw_index)
    raw[2] = np.nan
    with pytest.raises(deepssim.DeepSSIMError, match="NaN"):
        engine.ssim_raw_pairs(prepared, raw, train_rows, raw_index)


@pytest.fixture(params=["avx512", "avx2", "baseline"])
def instruction_set(request):
    """Each of the pair kernel's instruction sets this CPU has (CI machines differ)."""
    if _ssim_kernel is None:
        pytest.skip("the C kernel is not built")
    chosen = _ssim_kernel.instruction_set()
    if not _ssim_kernel.set_instruction_set(request.param):
        pytest.skip(f"this CPU has no {request.param}")
    yield request.param
    _ssim_kernel.set_instruction_set(chosen)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("counts", [(5, 37), (7, 3)])  # split over generated / training images
@pytest.mark.parametrize("generated_as", ["prepared", "raw"])
def test_c_kernel_matches_scikit_image_on_every_instruction_set(
    instruction_set, dtype, threads, counts, generated_as
):
    """Generated images fill SIMD lanes (4 to 16 a vector); 37 leaves a block with empty lanes,
    and 45 columns span several restarts of the horizontal running sum. Generated images come
    prepared, or raw for the kernel to prepare into its lanes itself."""
    rng = np.random.default_rng(3)
    train = np.stack([smooth_image(rng, (26, 45)) for _ in range(counts[0])])
    generated = np.stack([smooth_image(rng, (26, 45)) for _ in range(counts[1])])
    if generated_as == "prepared":
        generated_input = engine.prepare(generated, "generated", dtype=dtype)
    else:
        generated_input = generated
    got = engine._ssim_c(engine.prepare(train, "train", dtype=dtype), generated_input, threads, None)
    tolerance = 1e-9 if dtype == np.float64 else 2e-5
    assert np.abs(got - reference_matrix(train, generated)).max() <= tolerance
