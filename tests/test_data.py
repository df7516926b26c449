"""Datasets, split, cache, augmentation and batching of spfde_edge.data."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spfde_edge import data as data_module
from spfde_edge.data import (
    DataError,
    ImageData,
    augment_batch,
    iterate_batches,
    load_dataset,
    normalize,
)

# Class name -> the one channel that is bright in its images, so a decoded image tells
# its class. Folder names are created out of order to check that classes are sorted.
FOLDER_CLASSES = {"zebra": 2, "ant": 0, "mole": 1}
FOLDER_SIZES = [(16, 16), (20, 12), (9, 31), (40, 40), (7, 7)]


def _solid(size: tuple[int, int], channel: int, value: int = 220) -> Image.Image:
    colour = [20, 20, 20]
    colour[channel] = value
    return Image.new("RGB", size, tuple(colour))


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """3 classes × 5 solid-colour images of different sizes, PNG and JPEG mixed."""
    root = tmp_path / "folder"
    for class_name, channel in FOLDER_CLASSES.items():
        (root / class_name).mkdir(parents=True)
        for index, size in enumerate(FOLDER_SIZES):
            suffix = "jpg" if index % 2 else "png"
            _solid(size, channel).save(root / class_name / f"{index}.{suffix}")
    (root / "ant" / "notes.txt").write_text("not an image")
    return root


def _all_samples(split) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.cat([split.train.images, split.val.images]),
        torch.cat([split.train.labels, split.val.labels]),
    )


def test_imagefolder_shapes_labels_and_sorted_classes(image_folder, tmp_path):
    split = load_dataset("imagefolder", data_dir=image_folder, input_size=16, val_fraction=0.2,
                         cache_dir=tmp_path / "cache")
    assert split.classes == ["ant", "mole", "zebra"]
    assert split.num_classes == 3
    assert (len(split.train), len(split.val)) == (12, 3)
    assert split.train.images.dtype == torch.uint8
    assert split.train.images.shape[1:] == (3, 16, 16)
    images, labels = _all_samples(split)
    assert torch.bincount(labels).tolist() == [5, 5, 5]
    # Each image's bright channel is the channel of the class its label names.
    bright = images.float().mean(dim=(2, 3)).argmax(dim=1)
    expected = torch.tensor([FOLDER_CLASSES[split.classes[label]] for label in labels])
    assert torch.equal(bright, expected)


def test_imagefolder_second_load_hits_cache(image_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_dataset("imagefolder", data_dir=image_folder, input_size=16, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1
    assert not list(cache.glob("*.tmp"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image although the cache is valid")

    monkeypatch.setattr(data_module, "_decode_image", no_decoding)
    second = load_dataset("imagefolder", data_dir=image_folder, input_size=16, cache_dir=cache)
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.train.labels, second.train.labels)
    assert torch.equal(first.val.images, second.val.images)
    assert first.classes == second.classes
    assert first.mean == second.mean and first.std == second.std


def test_imagefolder_cache_invalidated_when_a_file_changes(image_folder, tmp_path):
    cache = tmp_path / "cache"
    before = load_dataset("imagefolder", data_dir=image_folder, input_size=16, val_fraction=0.0,
                          cache_dir=cache)
    changed = image_folder / "ant" / "0.png"
    _solid(FOLDER_SIZES[0], channel=0, value=90).save(changed)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = load_dataset("imagefolder", data_dir=image_folder, input_size=16, val_fraction=0.0,
                         cache_dir=cache)
    # Files are listed sorted per class, so ant/0.png is sample 0 in both loads.
    assert before.train.images[0, 0, 0, 0] == 220
    assert after.train.images[0, 0, 0, 0] == 90
    assert torch.equal(before.train.images[1:], after.train.images[1:])
    assert len(list(cache.glob("*.npz"))) == 2


def test_imagefolder_cache_depends_on_input_size(image_folder, tmp_path):
    small = load_dataset("imagefolder", data_dir=image_folder, input_size=8, cache_dir=tmp_path)
    large = load_dataset("imagefolder", data_dir=image_folder, input_size=12, cache_dir=tmp_path)
    assert small.train.images.shape[-1] == 8 and large.train.images.shape[-1] == 12


def test_imagefolder_unreadable_image_names_the_file(image_folder, tmp_path):
    broken = image_folder / "mole" / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_dataset("imagefolder", data_dir=image_folder, cache_dir=tmp_path / "cache")


def test_imagefolder_missing_or_empty_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=str(missing)):
        load_dataset("imagefolder", data_dir=missing, cache_dir=tmp_path)
    flat = tmp_path / "flat"
    flat.mkdir()
    _solid((8, 8), 0).save(flat / "a.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_dataset("imagefolder", data_dir=flat, cache_dir=tmp_path)


def test_digits_split_and_shape():
    split = load_dataset("digits", val_fraction=0.1, seed=0)
    assert len(split.train) + len(split.val) == 1797
    # Stratified: round(0.1 * class size) per class goes to validation.
    class_sizes = np.bincount(np.concatenate([split.train.labels.numpy(), split.val.labels.numpy()]))
    assert len(split.val) == sum(round(0.1 * n) for n in class_sizes)
    assert torch.bincount(split.val.labels, minlength=10).min() >= 17
    assert split.train.images.shape[1:] == (3, 32, 32)
    assert torch.equal(split.train.images[:, 0], split.train.images[:, 2])
    assert int(split.train.images.max()) == 255 and int(split.train.images.min()) == 0
    assert split.classes == [str(d) for d in range(10)]
    assert all(0.0 < m < 1.0 for m in split.mean) and all(s > 0.0 for s in split.std)


def test_split_is_fixed_by_seed():
    first = load_dataset("digits", seed=3)
    again = load_dataset("digits", seed=3)
    other = load_dataset("digits", seed=4)
    assert torch.equal(first.val.images, again.val.images)
    assert torch.equal(first.train.labels, again.train.labels)
    assert not torch.equal(first.val.images, other.val.images)


def test_mean_and_std_are_those_of_the_train_split():
    split = load_dataset("synthetic", synthetic_size=200, seed=1)
    pixels = split.train.images.double() / 255.0
    assert np.allclose(split.mean, pixels.mean(dim=(0, 2, 3)).numpy())
    assert np.allclose(split.std, pixels.std(dim=(0, 2, 3), unbiased=False).numpy())


def test_synthetic_is_deterministic_by_seed():
    first = load_dataset("synthetic", synthetic_size=100, seed=7)
    again = load_dataset("synthetic", synthetic_size=100, seed=7)
    other = load_dataset("synthetic", synthetic_size=100, seed=8)
    assert len(first.train) + len(first.val) == 100 and first.num_classes == 10
    assert torch.equal(first.train.images, again.train.images)
    assert torch.equal(first.train.labels, again.train.labels)
    assert not torch.equal(first.train.images, other.train.images)


@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_is_learnable_by_nearest_class_mean(seed):
    split = load_dataset("synthetic", synthetic_size=512, seed=seed, val_fraction=0.25)
    train_x = split.train.images.float().flatten(1)
    val_x = split.val.images.float().flatten(1)
    class_means = torch.stack([train_x[split.train.labels == c].mean(0) for c in range(10)])
    predicted = torch.cdist(val_x, class_means).argmin(dim=1)
    accuracy = (predicted == split.val.labels).float().mean().item()
    assert accuracy > 0.5


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(DataError, match="cifar10.*imagefolder.*digits.*synthetic"):
        load_dataset("mnist")


def test_val_fraction_out_of_range():
    with pytest.raises(DataError, match="val_fraction"):
        load_dataset("synthetic", val_fraction=1.0)


@pytest.mark.parametrize("name, title", [("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100")])
def test_cifar_missing_without_download_names_the_path(tmp_path, name, title):
    with pytest.raises(DataError) as caught:
        load_dataset(name, data_dir=tmp_path / "empty", download=False)
    message = str(caught.value)
    assert title in message and str(tmp_path / "empty") in message and "--download" in message


def _random_images(n: int = 64, size: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=generator, dtype=torch.uint8)


def test_augment_keeps_shape_dtype_and_changes_images():
    images = _random_images()
    out = augment_batch(images, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    changed = (out != images).flatten(1).any(dim=1)
    assert changed.sum() > len(images) // 2


def test_augment_is_deterministic_for_the_same_generator_state():
    images = _random_images()
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    first = augment_batch(images, generator)
    generator.set_state(state)
    assert torch.equal(augment_batch(images, generator), first)
    assert not torch.equal(augment_batch(images, generator), first)


def test_augment_output_is_a_padded_crop_of_its_own_input():
    pad, size = 2, 8
    images = _random_images(n=16, size=size)
    out = augment_batch(images, torch.Generator().manual_seed(1), pad=pad, flip=True)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    seen = set()
    for sample, result in zip(padded, out):
        matches = [
            (dy, dx, flipped)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for flipped in (False, True)
            if torch.equal(result, sample[:, dy : dy + size, dx : dx + size].flip(-1)
                           if flipped else sample[:, dy : dy + size, dx : dx + size])
        ]
        assert len(matches) == 1
        seen.add(matches[0])
    # Row offsets, column offsets and flips all vary across the batch.
    assert len({dy for dy, _, _ in seen}) > 1
    assert len({dx for _, dx, _ in seen}) > 1
    assert {flipped for _, _, flipped in seen} == {False, True}


def test_flip_mirrors_columns_of_a_known_image():
    image = torch.arange(3 * 4 * 5, dtype=torch.uint8).reshape(1, 3, 4, 5)
    batch = image.repeat(32, 1, 1, 1)
    out = augment_batch(batch, torch.Generator().manual_seed(0), pad=0, flip=True)
    flipped = (out == image.flip(-1)).flatten(1).all(dim=1)
    unchanged = (out == image).flatten(1).all(dim=1)
    assert torch.all(flipped ^ unchanged)
    assert 0 < flipped.sum() < 32
    assert out[flipped.nonzero()[0, 0], 0, 0].tolist() == [4, 3, 2, 1, 0]
    same = augment_batch(batch, torch.Generator().manual_seed(0), pad=0, flip=False)
    assert torch.equal(same, batch)


def test_normalize_known_values():
    images = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    out = normalize(images, mean=(0.0, 0.5, 0.2), std=(1.0, 0.5, 0.1))
    assert out.dtype == torch.float32
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)


def _toy_data(n: int = 50) -> ImageData:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return ImageData(images=images, labels=torch.arange(n, dtype=torch.int64) % 7)


def test_iterate_batches_covers_each_index_once_with_matching_labels():
    data = _toy_data()
    indices = np.array([3, 7, 8, 10, 11, 20, 21, 22, 30, 41, 42, 49])
    batches = list(iterate_batches(data, indices, 5, torch.Generator().manual_seed(0),
                                   augment=False, mean=(0, 0, 0), std=(1, 1, 1)))
    assert [len(idx) for _, _, idx in batches] == [5, 5, 2]
    seen = torch.cat([idx for _, _, idx in batches])
    assert sorted(seen.tolist()) == indices.tolist()
    assert seen.tolist() != indices.tolist()  # shuffled
    for x, y, idx in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and idx.dtype == torch.int64
        assert torch.equal(y, data.labels[idx])
        # Each toy image is filled with its own index, so x names the sample it came from.
        assert torch.allclose(x[:, 0, 0, 0] * 255, idx.float())


def test_iterate_batches_without_generator_keeps_the_given_order():
    data = _toy_data()
    indices = torch.tensor([9, 2, 40, 5])
    batches = list(iterate_batches(data, indices, 3, None, augment=False, mean=(0, 0, 0),
                                   std=(1, 1, 1)))
    assert torch.cat([idx for _, _, idx in batches]).tolist() == [9, 2, 40, 5]


def test_iterate_batches_is_deterministic_and_drops_last():
    data = _toy_data()

    def epoch(seed):
        return list(iterate_batches(data, np.arange(50), 8, torch.Generator().manual_seed(seed),
                                    augment=True, mean=(0.5,) * 3, std=(0.25,) * 3,
                                    drop_last=True))

    first, again, other = epoch(0), epoch(0), epoch(1)
    assert len(first) == 6 and all(len(idx) == 8 for _, _, idx in first)
    for (x1, y1, i1), (x2, y2, i2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)
    assert not torch.equal(torch.cat([i for *_, i in first]), torch.cat([i for *_, i in other]))


def test_iterate_batches_rejects_bad_arguments():
    data = _toy_data()
    with pytest.raises(DataError, match="Generator"):
        iterate_batches(data, np.arange(4), 2, None, augment=True, mean=(0,) * 3, std=(1,) * 3)
    with pytest.raises(DataError, match="indices"):
        iterate_batches(data, np.array([0, 50]), 2, None, augment=False, mean=(0,) * 3,
                        std=(1,) * 3)
