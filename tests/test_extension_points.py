"""Every extension point takes a new entry through its public registry, in one place each: a
metric, a file reader, a search backend, an engine, an architecture and an augmentation set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import deepssim
from deepssim.embedding.networks import ARCHITECTURES, build_network
from deepssim.execution import ENGINES, SEARCH_BACKENDS, LocalEngine
from deepssim.execution.search import _top_k_torch
from deepssim.io.load import READERS
from deepssim.metrics import METRICS, SimilarityMetric
from deepssim.training.augment import AUGMENTATION_SETS, augment_batch
from tests.helpers import smooth_image


@pytest.fixture(autouse=True)
def restore_registries(monkeypatch):
    """Each test's toy entries disappear afterwards."""
    for registry in (METRICS, READERS, SEARCH_BACKENDS, ENGINES, ARCHITECTURES, AUGMENTATION_SETS):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))


def _toy_folder(tmp_path, rng, count=4, name="train"):
    folder = tmp_path / name
    folder.mkdir()
    for i in range(count):
        np.savetxt(folder / f"image_{i}.toy", smooth_image(rng, (24, 20)))
    return folder


def test_a_reader_a_metric_a_search_backend_and_an_engine(tmp_path, rng):
    @READERS.register(".toy")
    def read_toy(path, options):
        return np.loadtxt(path)

    @METRICS.register("toy")
    class ToyMetric(SimilarityMetric):
        """Cosine of the centred pixels: an embedding metric in a few lines."""

        is_embedding = True
        thresholds = (0.5, 0.99)
        description = "toy"

        def embed(self, images, batch_size=64, precision="float32", progress=False):
            flat = np.stack([np.asarray(image, dtype=np.float64).ravel() for image in images])
            flat -= flat.mean(axis=1, keepdims=True)
            return (flat / np.linalg.norm(flat, axis=1, keepdims=True)).astype(np.float32)

    searched = []

    @SEARCH_BACKENDS.register("toy-search")
    def toy_search(queries, database, k, block_bytes):
        searched.append(len(queries))
        return _top_k_torch(queries, database, k, block_bytes)

    mapped = []

    @ENGINES.register("toy-engine")
    class ToyEngine(LocalEngine):
        def map(self, function, blocks, **kwargs):
            mapped.append(len(blocks))
            return super().map(function, blocks, **kwargs)

    train = _toy_folder(tmp_path, rng)
    generated = tmp_path / "generated"
    generated.mkdir()
    for i in range(2):  # exact copies of two training images
        (generated / f"copy_{i}.toy").write_text((train / f"image_{i}.toy").read_text())
    assert len(deepssim.load_images(train)[0]) == 4
    result = deepssim.scan(
        train, generated, metric="toy", search="toy-search", engine="toy-engine", cache=False
    )
    assert searched and mapped  # the scan went through the toy search and the toy engine
    assert result.summary.metric == "toy"
    assert [result.train_keys[i] for i in result.neighbours[:, 0]] == ["image_0", "image_1"]
    assert (result.classes == deepssim.Label.DUPLICATE).all()
    assert "toy-engine" in ENGINES and "toy-search" in SEARCH_BACKENDS


def test_an_architecture_and_an_augmentation_set():
    @ARCHITECTURES.register("toy_net")
    class ToyNet(nn.Module):
        input_channels = 1

        def __init__(self):
            super().__init__()
            self.project = nn.Linear(1, 8)

        def forward(self, x):
            return self.project(x.mean(dim=(2, 3), keepdim=False)[:, :1])

    @AUGMENTATION_SETS.register("toy_flip")
    def toy_flip(K, height, width):
        return [K.RandomHorizontalFlip(p=1.0)]

    network = build_network("toy_net")
    assert network(torch.zeros(2, 1, 16, 16)).shape == (2, 8)
    images = torch.from_numpy(np.stack([smooth_image(np.random.default_rng(0), (16, 16))])).float()[:, None]
    flipped = augment_batch(images, "toy_flip", seed=0)
    expected = augment_batch(images.flip(-1), "none")
    torch.testing.assert_close(flipped, expected, atol=1e-5, rtol=0)
    with pytest.raises(deepssim.DeepSSIMError, match="unknown architecture 'nope'; choose one of"):
        build_network("nope")
