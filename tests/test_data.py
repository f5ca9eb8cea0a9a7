"""Data: the built-in digits and image folders load, split stratified and reproducibly, and bad input is explained."""

from collections import Counter

import pytest
import torch
from PIL import Image

from searchspace import MixerNASError
from searchspace.data import LazyImages, load_data, stratified_split


def _labels(dataset):
    return [int(y) for _, y in dataset]


# ------------------------------------------------------------------------------------------------------- digits


def test_digits_default_shapes_and_split():
    data = load_data()
    assert (data.num_classes, data.in_chans, data.input_size) == (10, 1, 32)
    assert data.input_shape == (1, 32, 32)
    assert data.class_names == tuple("0123456789")
    assert len(data.train) + len(data.val) == 1797
    assert len(data.val) == pytest.approx(0.2 * 1797, abs=10)
    image, label = data.train[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32 and 0 <= int(label) < 10
    assert "digits" in data.describe() and "1x32x32" in data.describe()


def test_digits_are_normalised_with_training_statistics():
    images = load_data().train.tensors[0]
    assert images.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert images.std().item() == pytest.approx(1.0, abs=1e-3)


def test_digits_split_is_stratified():
    data = load_data(val_fraction=0.25)
    train, val = Counter(_labels(data.train)), Counter(_labels(data.val))
    for label in range(10):
        share = val[label] / (train[label] + val[label])
        assert share == pytest.approx(0.25, abs=0.01)


def test_digits_split_is_reproducible_and_depends_on_seed():
    a, b, c = load_data(seed=3), load_data(seed=3), load_data(seed=4)
    assert torch.equal(a.val.tensors[0], b.val.tensors[0]) and torch.equal(a.val.tensors[1], b.val.tensors[1])
    assert not torch.equal(a.val.tensors[1], c.val.tensors[1])


def test_digits_input_size_is_overridable():
    data = load_data(input_size=16)
    assert data.train[0][0].shape == (1, 16, 16) and data.input_size == 16


@pytest.mark.parametrize("size", [4, 7, 0, -32, 8.5, "32"])
def test_input_size_below_8_or_not_an_integer_is_an_error(size):
    with pytest.raises(MixerNASError, match="input size must be an integer of at least 8"):
        load_data(input_size=size)


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_val_fraction_outside_0_1_is_an_error(fraction):
    with pytest.raises(MixerNASError, match="val_fraction"):
        load_data(val_fraction=fraction)


def test_stratified_split_keeps_every_class_on_both_sides():
    labels = [0] * 2 + [1] * 3 + [2] * 50 + [3]
    train, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(train + val) == list(range(len(labels)))
    val_counts = Counter(labels[i] for i in val)
    assert val_counts == {0: 1, 1: 1, 2: 10}  # at least one each, a single item stays in training
    assert stratified_split(labels, 0.2, seed=0) == (train, val)


# ------------------------------------------------------------------------------------------------- image folder

COLOURS = {"cat": (250, 10, 10), "dog": (10, 250, 10), "emu": (10, 10, 250)}


@pytest.fixture
def folder(tmp_path):
    """3 classes x 5 images of 12x10 pixels, in several formats, plus files that must be ignored."""
    root = tmp_path / "photos"
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(5):
            shade = tuple(max(0, c - 20 * i) for c in colour)
            ext = ("png", "jpg", "bmp", "png", "webp")[i]
            Image.new("RGB", (12, 10), shade).save(root / name / f"{i}.{ext}")
    Image.new("L", (12, 10), 128).save(root / "dog" / "grey.png")  # greyscale becomes RGB
    (root / "cat" / "nested").mkdir()
    Image.new("RGB", (10, 12), (200, 0, 0)).save(root / "cat" / "nested" / "deep.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    Image.new("RGB", (4, 4)).save(root / "cat" / ".hidden.png")
    (root / ".cache").mkdir()
    return root


def test_folder_loads_rgb_squares_with_class_names(folder):
    data = load_data(folder, input_size=16)
    assert data.class_names == ("cat", "dog", "emu") and data.num_classes == 3
    assert data.in_chans == 3 and data.input_shape == (3, 16, 16)
    assert len(data.train) + len(data.val) == 6 + 6 + 5  # nested included; txt, hidden files and folders ignored
    assert data.train[0][0].shape == (3, 16, 16)
    assert Counter(_labels(data.val)) == {0: 1, 1: 1, 2: 1}
    assert str(folder) in data.source


def test_folder_default_input_size_is_64(folder):
    data = load_data(folder)
    assert data.input_size == 64 and data.train[0][0].shape == (3, 64, 64)


def test_folder_split_is_reproducible(folder):
    a, b = load_data(folder, input_size=8, seed=1), load_data(folder, input_size=8, seed=1)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.val.tensors[1], b.val.tensors[1])


def test_colours_survive_loading(folder):
    data = load_data(folder, input_size=8)
    mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    for image, label in data.train:
        rgb = (image * std + mean).mean(dim=(1, 2))
        if data.class_names[int(label)] == "emu":
            assert rgb[2] > rgb[0] and rgb[2] > rgb[1]  # blue images stay blue


def test_large_folder_is_loaded_lazily_with_the_same_images(folder):
    eager = load_data(folder, input_size=8)
    lazy = load_data(folder, input_size=8, max_memory_mb=0)
    assert isinstance(lazy.train, LazyImages) and "lazy" in lazy.source
    assert len(lazy.train) == len(eager.train)
    assert torch.allclose(lazy.train[0][0], eager.train[0][0], atol=1e-4)


def test_missing_folder(tmp_path):
    with pytest.raises(MixerNASError, match="does not exist; pass a folder with one sub-folder of images per class"):
        load_data(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(MixerNASError, match="is a file, not a folder"):
        load_data(path)


def test_folder_without_class_subfolders(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    with pytest.raises(MixerNASError, match=r"has no class sub-folders \(it holds 1 images directly\); put the images"):
        load_data(tmp_path)


def test_empty_folder(tmp_path):
    with pytest.raises(MixerNASError, match="has no class sub-folders; put the images of each class"):
        load_data(tmp_path)


def test_one_class_is_not_enough(tmp_path):
    (tmp_path / "cat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "cat" / "a.png")
    with pytest.raises(MixerNASError, match=r"only 1 class sub-folder \('cat'\); .* at least 2 classes"):
        load_data(tmp_path)


def test_class_without_images(folder):
    (folder / "fox").mkdir()
    (folder / "fox" / "readme.txt").write_text("todo")
    with pytest.raises(MixerNASError, match=r"class folder .*fox' has no images .*; add images to it or remove it"):
        load_data(folder)


def test_unreadable_image_is_named(folder):
    (folder / "dog" / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(MixerNASError, match=r"cannot read image .*broken\.jpg' .*; fix or remove the file"):
        load_data(folder)
    with pytest.raises(MixerNASError, match=r"broken\.jpg"):
        load_data(folder, max_memory_mb=0)  # the lazy path checks every file up front too


def test_single_image_per_class_cannot_be_split(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / name / "1.png")
    with pytest.raises(MixerNASError, match="too few images to hold out a validation set"):
        load_data(tmp_path)
