"""Attribution maps: where a pair's similarity is lost, and the local SSIM map."""

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from deepssim import DeepSSIM, DeepSSIMError
from tests.helpers import EXAMPLE
from tests.test_ssim import reference_matrix


@pytest.fixture(scope="module")
def pair():
    """A training slice, and the same slice with faint noise everywhere and a bright lesion-like blob
    in one known region."""
    from deepssim.io.load import load_images

    _, images = load_images(EXAMPLE / "train")
    a = images[0].astype(np.float64)
    rng = np.random.default_rng(0)
    b = a + rng.normal(0, 0.01 * a.std(), a.shape)
    region = np.zeros(a.shape, dtype=bool)
    region[40:64, 60:84] = True
    rows, columns = np.mgrid[: a.shape[0], : a.shape[1]]
    b += 2.5 * a.std() * np.exp(-((rows - 52) ** 2 + (columns - 72) ** 2) / (2 * 5.0**2))
    return a, b, region


def test_lost_similarity_concentrates_where_the_images_differ(pair):
    a, b, region = pair
    model = DeepSSIM.load("default")
    explanation = model.explain(a, b)
    assert explanation.cosine == pytest.approx(model.similarity(a, b), abs=1e-4)
    # completeness of integrated gradients: the map sums to the similarity lost
    assert explanation.lost_similarity.sum() == pytest.approx(1 - explanation.cosine, abs=0.02)
    mass = np.abs(explanation.lost_similarity)
    assert mass[region].sum() > 0.5 * mass.sum()  # the region is 3.5% of the image


def test_local_ssim_map_is_scikit_images(pair):
    a, b, _ = pair
    explanation = DeepSSIM.load("default").explain(a, b, steps=4)
    za, zb = (a - a.mean()) / a.std(), (b - b.mean()) / b.std()
    _, expected = structural_similarity(za, zb, data_range=za.max() - za.min(), full=True)
    np.testing.assert_allclose(explanation.ssim_map, expected, atol=1e-10)
    assert explanation.ssim == pytest.approx(reference_matrix(a[None], b[None])[0, 0], abs=1e-10)
    with pytest.raises(DeepSSIMError, match="one size"):
        DeepSSIM.load("default").explain(a, b[:-1])
