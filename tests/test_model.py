"""Networks, augmentations, checkpoints, TorchScript and the DeepSSIM embedding API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepssim import DeepSSIM, DeepSSIMError
from deepssim.embedding.model import make_config, prepare_input
from deepssim.embedding.networks import (
    ConvNeXtBaseEmbedder,
    build_network,
    imagenet_weights_path,
    load_imagenet_weights,
)
from deepssim.training.augment import augment_batch
from tests.helpers import smooth_image


def fast_model(seed: int = 0) -> DeepSSIM:
    torch.manual_seed(seed)
    network = build_network("deepssim_fast")
    return DeepSSIM(network, make_config("deepssim_fast", 1, 256))


@pytest.mark.parametrize(
    "architecture, shape",
    [
        ("deepssim_fast", (45, 61)),
        ("deepssim_wide", (40, 36)),
        ("deepssim_spatial", (45, 61)),
        ("convnext_tiny_gem", (64, 48)),
        ("convnext_base", (64, 64)),
    ],
)
def test_every_architecture_embeds_any_size_to_256(architecture, shape):
    network = build_network(architecture).eval()
    x = torch.randn(2, network.input_channels, *shape)
    with torch.no_grad():
        out = network(x)
        if architecture.startswith("deepssim"):  # the CPU models also export to TorchScript
            torch.testing.assert_close(torch.jit.script(network)(x), out)
    assert out.shape == (2, 256)
    assert torch.isfinite(out).all()


def test_paper_models_freeze_stem_and_first_stage():
    network = build_network("convnext_tiny_gem")
    frozen = [not p.requires_grad for p in network.features[:2].parameters()]
    assert all(frozen)
    assert all(p.requires_grad for p in network.features[2:].parameters())


def test_imagenet_weights_load_from_a_local_file_only(tmp_path, monkeypatch):
    from torchvision.models import convnext_tiny

    torch.manual_seed(1)
    reference = convnext_tiny(weights=None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(DeepSSIMError, match="download.pytorch.org/models/convnext_tiny-983f1562.pth"):
        imagenet_weights_path("convnext_tiny_gem")
    cached = tmp_path / "hub" / "checkpoints" / "convnext_tiny-983f1562.pth"
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    network = build_network("convnext_tiny_gem")
    assert load_imagenet_weights(network, "convnext_tiny_gem") == cached
    for key, value in reference.features.state_dict().items():
        torch.testing.assert_close(network.features.state_dict()[key], value)
    with pytest.raises(DeepSSIMError, match="do not fit"):
        load_imagenet_weights(build_network("convnext_base"), "convnext_base", cached)
    with pytest.raises(DeepSSIMError, match="no ImageNet weights"):
        imagenet_weights_path("deepssim_fast")


@pytest.mark.parametrize("name", ["v1", "v2", "robust", "rigid", "misaligned"])
def test_augmentations_are_seeded_per_image_and_rezscored(name, rng):
    image = torch.from_numpy(smooth_image(rng, (48, 40))).float()
    batch = image.expand(16, 1, 48, 40)
    first = augment_batch(batch, name, seed=3)
    assert torch.equal(first, augment_batch(batch, name, seed=3))
    assert not torch.equal(first, augment_batch(batch, name, seed=4))
    distinct = {tuple(view.flatten()[:50].tolist()) for view in first}
    assert len(distinct) > 1  # parameters are drawn per image, not per batch
    torch.testing.assert_close(first.mean(dim=(-2, -1)), torch.zeros(16, 1), atol=1e-4, rtol=0)
    torch.testing.assert_close(first.std(dim=(-2, -1), unbiased=False), torch.ones(16, 1), atol=1e-3, rtol=0)


def test_misaligned_views_flip_images():
    """Each view's best-matching flip of an asymmetric image tells which flips were drawn: the
    protocol flips each axis with probability 0.8, so about 80% of views per axis."""
    image = torch.zeros(1, 1, 32, 32)
    image[..., 4:14, 6:12] = 1.0  # a block in the top-left quadrant
    image[..., 20:24, 18:28] = 0.5
    views = augment_batch(image.expand(200, 1, 32, 32), "misaligned", seed=0)
    candidates = {(r, c): augment_batch(_flipped(image, r, c), "none")[0, 0] for r in (0, 1) for c in (0, 1)}
    best = [max(candidates, key=lambda rc: float((view[0] * candidates[rc]).sum())) for view in views]
    rows = np.mean([r for r, _ in best])
    columns = np.mean([c for _, c in best])
    assert 0.7 < rows < 0.9 and 0.7 < columns < 0.9
    unchanged = augment_batch(image, "none")
    assert float((unchanged[0, 0] * candidates[(0, 0)]).sum()) > float(
        (unchanged[0, 0] * candidates[(1, 1)]).sum()
    )


def _flipped(image: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    dims = [d for d, on in ((-2, rows), (-1, columns)) if on]
    return image.flip(dims) if dims else image


def test_embed_api_shapes_normalisation_and_inputs(rng):
    model = fast_model()
    images = np.stack([smooth_image(rng, (40, 36)) for _ in range(5)])
    embeddings = model.embed(images, batch_size=2)
    assert embeddings.shape == (5, 256) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    # raw intensities are z-scored inside: scaling and shifting an image changes nothing
    np.testing.assert_allclose(model.embed(images * 7 + 100), embeddings, atol=1e-4)
    assert model.similarity(images[0], images[0]) == pytest.approx(1.0, abs=1e-5)
    matrix = model.matrix(images[:2], images)
    np.testing.assert_allclose(matrix, embeddings[:2] @ embeddings.T, atol=1e-5)
    mixed = [images[0], smooth_image(rng, (50, 30)), images[1]]
    np.testing.assert_allclose(model.embed(mixed)[[0, 2]], embeddings[:2], atol=1e-5)
    with pytest.raises(DeepSSIMError, match="constant"):
        model.embed(np.zeros((1, 20, 20)))


@pytest.mark.parametrize("value", [0.0, 0.1, 3.3333, 98765.4321])
def test_network_input_is_the_float64_z_score_and_refuses_constant_or_non_finite_images(value, rng):
    """prepare_input against NumPy's float64 z-score; a constant image is refused even where its
    float32 mean is inexact (its sd is then a rounding error, not 0), and so is a NaN or Inf pixel,
    while a nearly constant image is not."""
    images = rng.normal(value, 1 + abs(value), (3, 20, 17))
    expected = (images - images.mean(axis=(1, 2), keepdims=True)) / images.std(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(prepare_input(images, 1)[:, 0].numpy(), expected, atol=1e-4)
    nearly = np.full((1, 20, 17), value)
    nearly[0, 4, 5] += 0.01 * (1 + abs(value))
    assert np.isfinite(prepare_input(nearly, 3).numpy()).all()
    constant = images.copy()
    constant[1] = value
    with pytest.raises(DeepSSIMError, match="constant"):
        prepare_input(constant, 1)
    for bad in (np.nan, np.inf):
        broken = images.copy()
        broken[2, 3, 4] = bad
        with pytest.raises(DeepSSIMError, match="NaN/Inf"):
            prepare_input(broken, 1)


@pytest.mark.parametrize("architecture", ["deepssim_fast", "deepssim_spatial", "convnext_tiny_gem"])
def test_embeddings_with_batch_norm_folded_match_the_network_and_follow_its_weights(architecture, rng):
    network = build_network(architecture)
    generator = torch.Generator().manual_seed(0)
    for module in network.modules():  # trained statistics, so folding them changes the weights
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    model = DeepSSIM(network, make_config(architecture, network.input_channels, 256))
    images = np.stack([smooth_image(rng, (48, 40)) for _ in range(3)])

    def unfused() -> np.ndarray:
        with torch.no_grad():
            out = model.network(prepare_input(images, model.input_channels)).numpy()
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    np.testing.assert_allclose(model.embed(images), unfused(), atol=2e-5)
    with torch.no_grad():  # as an optimiser step: in place
        next(model.network.parameters()).mul_(1.5)
    np.testing.assert_allclose(model.embed(images), unfused(), atol=2e-5)


def test_checkpoint_round_trip(tmp_path, rng):
    model = fast_model()
    images = np.stack([smooth_image(rng, (32, 32)) for _ in range(3)])
    path = model.save(tmp_path / "m", training={"note": "test"})
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    for source in (path, path.with_suffix(".json")):
        loaded = DeepSSIM.load(source)
        np.testing.assert_array_equal(loaded.embed(images), model.embed(images))
    config = json.loads(path.with_suffix(".json").read_text())
    assert config["thresholds"] == {"low": 0.6, "high": 0.85}
    assert config["training"] == {"note": "test"}


def test_bad_checkpoints_give_clear_errors(tmp_path):
    path = fast_model().save(tmp_path / "good")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    (tmp_path / "truncated.json").write_text(path.with_suffix(".json").read_text())
    with pytest.raises(DeepSSIMError, match="truncated or corrupt"):
        DeepSSIM.load(truncated)
    config = json.loads(path.with_suffix(".json").read_text())
    config["architecture"] = "convnext_tiny_gem"
    mismatched = tmp_path / "mismatched.safetensors"
    mismatched.write_bytes(path.read_bytes())
    mismatched.with_suffix(".json").write_text(json.dumps(config))
    with pytest.raises(DeepSSIMError, match="do not match architecture"):
        DeepSSIM.load(mismatched)
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(path.read_bytes())
    foreign.with_suffix(".json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(DeepSSIMError, match="not a DeepSSIM checkpoint"):
        DeepSSIM.load(foreign)
    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes(path.read_bytes())
    with pytest.raises(DeepSSIMError, match="needs .safetensors and .json"):
        DeepSSIM.load(lonely)
    pickle = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(3)}, pickle)
    with pytest.raises(DeepSSIMError, match="neither a DeepSSIM checkpoint"):
        DeepSSIM.load(pickle)
    with pytest.raises(DeepSSIMError, match="no such model"):
        DeepSSIM.load(tmp_path / "missing.safetensors")


def test_torchscript_export_round_trip(tmp_path, rng):
    model = fast_model()
    images = np.stack([smooth_image(rng, (40, 40)) for _ in range(3)])
    path = model.export_torchscript(tmp_path / "fast.pt")
    scripted = DeepSSIM.load(path)
    assert scripted.input_channels == 3
    np.testing.assert_allclose(scripted.embed(images), model.embed(images), atol=1e-5)


def test_authors_style_torchscript_of_the_paper_architecture(tmp_path, rng):
    """A (B, 3, H, W) -> (B, 256) TorchScript file, as the authors publish, works everywhere."""
    torch.manual_seed(0)
    paper = ConvNeXtBaseEmbedder().eval()
    example = torch.randn(2, 3, 64, 64)
    path = tmp_path / "deepssim_authors.pt"
    torch.jit.trace(paper, example).save(str(path))
    model = DeepSSIM.load(path)
    images = np.stack([smooth_image(rng, (64, 64)) for _ in range(2)])
    z = (images - images.mean(axis=(1, 2), keepdims=True)) / images.std(axis=(1, 2), keepdims=True)
    with torch.no_grad():
        expected = paper(torch.from_numpy(z).float().unsqueeze(1).repeat(1, 3, 1, 1)).numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(model.embed(images), expected, atol=1e-4)
    assert model.config["embedding_dim"] == 256


def test_bundled_default_model_loads_and_finds_the_planted_copies():
    import csv

    from deepssim import load_images
    from tests.helpers import EXAMPLE

    model = DeepSSIM.load("default")
    weights = model.config["training"]
    # a trained model: its shipped epoch (a fine-tune ships its last) is not the start
    assert (
        model.config["architecture"] == "deepssim_fast"
        and weights.get("shipped_epoch", weights["best_epoch"]) >= 1
    )
    from importlib import resources

    size = (resources.files("deepssim.embedding") / "weights" / "default.safetensors").stat().st_size
    assert size <= 25 * 2**20
    train_keys, train = load_images(EXAMPLE / "train")
    generated_keys, generated = load_images(EXAMPLE / "generated")
    scores = model.matrix(train, generated)
    with open(EXAMPLE / "planted.csv", newline="") as handle:
        planted = list(csv.DictReader(handle))
    for row in planted:
        if row["kind"] in ("duplicate", "duplicate_misaligned"):
            column = generated_keys.index(row["generated_key"])
            assert train_keys[int(np.argmax(scores[:, column]))] == row["source_train_key"]
            assert scores[:, column].max() > 0.85
