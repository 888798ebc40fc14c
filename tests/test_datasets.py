"""The bundled dataset plugins, loaded through the plugin registry from tiny files written
in the real on-disk formats (no network)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import stitchbench
from stitchbench import UsageError
from stitchbench.nn.data import TensorSplit


def load(name: str, data_dir: Path | None = None, **params):
    plugin = stitchbench.get_plugin(name)
    return plugin.load(plugin.Params(**params), data_dir)


# -- digits ---------------------------------------------------------------------------


def test_digits_sizes_range_and_labels():
    ds = load("digits")
    assert (ds.num_classes, ds.image_shape) == (10, (1, 8, 8))
    assert (len(ds.train), len(ds.test)) == (1437, 360)
    assert isinstance(ds.train, TensorSplit) and ds.train.images.dtype == torch.float32
    x = torch.cat([ds.train.images, ds.test.images])
    assert x.min() == 0.0 and x.max() == 1.0  # 0..16 grey levels divided by 16
    assert torch.allclose(x * 16, (x * 16).round())
    assert ds.augment is None


def test_digits_split_is_stratified_and_deterministic():
    a, b = load("digits"), load("digits")
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
    counts = torch.bincount(a.test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # about 180 images per class, 20% held out
    other = load("digits", split_seed=1)
    assert not torch.equal(a.test.labels, other.test.labels)
    # Together the splits are the whole set: the per-class counts add up to scikit-learn's.
    from sklearn.datasets import load_digits

    together = torch.bincount(torch.cat([a.train.labels, a.test.labels]), minlength=10)
    assert together.tolist() == np.bincount(load_digits().target, minlength=10).tolist()


# -- noise ----------------------------------------------------------------------------


def test_noise_is_deterministic_in_range_and_shaped():
    a = load("noise", n_train=50, n_test=20, image_shape=(1, 8, 8), seed=3)
    b = load("noise", n_train=50, n_test=20, image_shape=(1, 8, 8), seed=3)
    assert (a.num_classes, a.image_shape) == (1, (1, 8, 8))
    assert a.train.images.shape == (50, 1, 8, 8) and a.test.images.shape == (20, 1, 8, 8)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    assert a.train.images.min() >= 0 and a.train.images.max() <= 1
    assert torch.all(a.train.labels == 0)
    assert not torch.equal(a.train.images[:20], a.test.images)  # the splits come from different seeds
    c = load("noise", n_train=50, n_test=20, image_shape=(1, 8, 8), seed=4)
    assert not torch.equal(a.train.images, c.train.images)
    assert stitchbench.get_plugin("noise").auxiliary


def test_noise_kinds_look_like_their_names():
    ds = load("noise", n_train=40, n_test=4, kinds=("rademacher", "blobs", "smooth", "uniform"))
    x = ds.train.images
    for binary in (x[0::4], x[1::4]):  # rademacher and blobs are black-and-white
        assert set(binary.unique().tolist()) <= {0.0, 1.0}

    # Low-frequency noise: neighbouring pixels differ far less than in uniform noise.
    def step(im: torch.Tensor) -> float:
        return float((im[..., 1:] - im[..., :-1]).abs().mean())

    assert step(x[2::4]) < 0.3 * step(x[3::4])


# -- cifar10 --------------------------------------------------------------------------


def write_cifar(root: Path, per_batch: int = 3, bytes_keys: bool = False) -> None:
    """A CIFAR-10 python tree in the real format, with ``per_batch`` images per file.

    Image k of the whole set (train batches 1..5, then test) has every pixel equal to
    k, except pixel (c=2, h=5, w=7) which is 200 + k (so order and layout can be checked);
    its label is k % 10. ``bytes_keys`` writes the dict keys as bytes (as a file pickled
    from a Python 3 dict of bytes would have them).
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    k = 0
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        imgs = np.empty((per_batch, 3, 32, 32), np.uint8)
        labels = []
        for j in range(per_batch):
            imgs[j] = k
            imgs[j, 2, 5, 7] = 200 + k
            labels.append(k % 10)
            k += 1
        entry = {"batch_label": name, "labels": labels, "data": imgs.reshape(per_batch, -1), "filenames": []}
        if bytes_keys:
            entry = {k.encode(): v for k, v in entry.items()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)], "num_cases_per_batch": per_batch}, f)


def test_cifar10_reads_the_pickle_tree(tmp_path):
    write_cifar(tmp_path)
    ds = load("cifar10", tmp_path)
    assert (ds.num_classes, ds.image_shape) == (10, (3, 32, 32))
    assert ds.train.images.shape == (15, 3, 32, 32) and ds.test.images.shape == (3, 3, 32, 32)
    # Order: batches 1..5 in turn, then the test batch; value range: uint8 / 255.
    assert ds.train.labels.tolist() == [k % 10 for k in range(15)]
    assert ds.test.labels.tolist() == [15 % 10, 16 % 10, 17 % 10]
    assert torch.allclose(ds.train.images[:, 0, 0, 0], torch.arange(15) / 255.0)
    assert torch.allclose(ds.test.images[:, 2, 5, 7], (200 + torch.arange(15, 18)) / 255.0)
    # Layout: the marked pixel is at (c=2, h=5, w=7) and nowhere else.
    img = ds.train.images[4]
    assert (img != 4 / 255.0).nonzero().tolist() == [[2, 5, 7]]
    assert ds.train.images.max() <= 1.0


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_limits(tmp_path, bytes_keys):
    write_cifar(tmp_path, bytes_keys=bytes_keys)
    ds = load("cifar10", tmp_path, limit_train=4, limit_test=2)
    assert (len(ds.train), len(ds.test)) == (4, 2)
    assert ds.train.labels.tolist() == [0, 1, 2, 3]


def test_cifar10_reader_agrees_with_torchvision(tmp_path, monkeypatch):
    """Our reader and torchvision's CIFAR10 see the same images and labels in the same files
    (torchvision's md5 checks are switched off: they refuse any file but the real ones)."""
    import torchvision.datasets.cifar as tv_cifar

    write_cifar(tmp_path)
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    ds = load("cifar10", tmp_path)
    for ours, train in ((ds.train, True), (ds.test, False)):
        tv = tv_cifar.CIFAR10(str(tmp_path), train=train)
        assert torch.equal(ours.labels, torch.tensor(tv.targets))
        assert torch.equal(ours.images, torch.from_numpy(tv.data).permute(0, 3, 1, 2) / 255.0)


def test_cifar10_augment_keeps_shape_and_is_deterministic(tmp_path):
    write_cifar(tmp_path)
    augment = load("cifar10", tmp_path).augment
    x = torch.rand(16, 3, 32, 32)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    c = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)


def test_cifar10_missing_files_name_the_paths(tmp_path):
    with pytest.raises(UsageError) as e:
        load("cifar10", tmp_path)
    msg = str(e.value)
    assert str((tmp_path / "cifar-10-batches-py" / "data_batch_1").resolve()) in msg
    assert "--download" in msg and "--data-dir" in msg
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(UsageError, match="test_batch"):
        load("cifar10", tmp_path)


# -- svhn -----------------------------------------------------------------------------


def write_svhn(root: Path, name: str, labels: list[int]) -> None:
    """An SVHN .mat file: X (32, 32, 3, N) uint8, y (N, 1) with 10 for the digit 0.

    Image n is all n, except X[h=3, w=9, c=1, n] = 250."""
    import scipy.io

    n = len(labels)
    x = np.broadcast_to(np.arange(n, dtype=np.uint8), (32, 32, 3, n)).copy()
    x[3, 9, 1, :] = 250
    scipy.io.savemat(root / name, {"X": x, "y": np.asarray(labels, np.uint8).reshape(n, 1)})


def test_svhn_maps_10_to_0_and_keeps_pixel_layout(tmp_path):
    write_svhn(tmp_path, "train_32x32.mat", [10, 1, 9, 10])
    write_svhn(tmp_path, "test_32x32.mat", [3, 10])
    ds = load("svhn", tmp_path)
    assert (ds.num_classes, ds.image_shape) == (10, (3, 32, 32))
    assert ds.train.labels.tolist() == [0, 1, 9, 0] and ds.test.labels.tolist() == [3, 0]
    assert ds.train.images.shape == (4, 3, 32, 32)
    img = ds.train.images[2]
    assert img[1, 3, 9] == pytest.approx(250 / 255)
    assert (img != 2 / 255).nonzero().tolist() == [[1, 3, 9]]
    # SVHN is cropped but never flipped: a flip would turn the marked column 9 into 22.
    x = ds.train.images
    for seed in range(5):
        out = ds.augment(x, torch.Generator().manual_seed(seed))
        marked = (out == 250 / 255).nonzero()[:, 3]  # the column of the marked pixel in each image
        assert out.shape == x.shape and torch.all((marked - 9).abs() <= 4)


def test_svhn_crop_augmentation_is_the_default_and_unchanged(tmp_path):
    from stitchbench import random_crop_flip

    write_svhn(tmp_path, "train_32x32.mat", [10, 1, 9, 10])
    write_svhn(tmp_path, "test_32x32.mat", [3, 10])
    assert stitchbench.get_plugin("svhn").Params().augmentation == "crop"
    x = load("svhn", tmp_path).train.images
    old = random_crop_flip(padding=4, flip=False)
    for ds in (load("svhn", tmp_path), load("svhn", tmp_path, augmentation="crop")):
        for seed in range(3):
            expected = old(x, torch.Generator().manual_seed(seed))
            assert torch.equal(ds.augment(x, torch.Generator().manual_seed(seed)), expected)
    with pytest.raises(Exception, match="augmentation"):
        load("svhn", tmp_path, augmentation="flip")


def test_svhn_authors_augmentation_is_seeded_unflipped_and_copies_pixels(tmp_path):
    from stitchbench_plugins.datasets.svhn import authors_augment

    write_svhn(tmp_path, "train_32x32.mat", [10, 1, 9, 10] * 8)
    write_svhn(tmp_path, "test_32x32.mat", [3, 10])
    ds = load("svhn", tmp_path, augmentation="authors")
    assert ds.augment is authors_augment
    x = ds.train.images
    a = ds.augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, ds.augment(x, torch.Generator().manual_seed(0)))  # repeatable
    assert not torch.equal(a, ds.augment(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, x)
    # Nearest neighbour over edge padding: every output pixel is a pixel of its own image or
    # the fill 0; images of constant value n (except the marked pixel) stay n near the middle.
    for i in range(len(x)):
        assert set(a[i].unique().tolist()) <= set(x[i].unique().tolist()) | {0.0}
        assert torch.all(a[i, :, 8:24, 8:24][a[i, :, 8:24, 8:24] != 250 / 255] == i / 255)
    # No flip: the marked pixel (column 9) moves by at most a few pixels (a flip sends it to 22).
    for seed in range(5):
        out = ds.augment(x, torch.Generator().manual_seed(seed))
        marked = (out == 250 / 255).nonzero()
        assert len(marked) and torch.all((marked[:, 3] - 9).abs() <= 4) and torch.all((marked[:, 2] - 3).abs() <= 4)


def test_svhn_authors_augmentation_matches_torchvision():
    """Each image is the authors' Compose(Pad(4, 'edge'), RandomAffine(5, scale=(0.9, 1.1),
    shear=5, fill=0), CenterCrop(32)) at the parameters drawn: pixel for pixel as torchvision
    computes it on a tensor, and all but a few rounding ties as it computes it on the PIL image."""
    import torchvision.transforms.functional as TF
    from PIL import Image
    from stitchbench_plugins.datasets.svhn import authors_affine, authors_affine_params
    from torchvision import transforms as T

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), generator=g).float() / 255
    angle, scale, shear = authors_affine_params(2000, torch.Generator().manual_seed(1))
    assert angle.abs().max() <= 5 and shear.abs().max() <= 5 and 0.9 <= scale.min() and scale.max() <= 1.1
    assert angle.abs().max() > 4.9 and shear.abs().max() > 4.9 and scale.min() < 0.91 and scale.max() > 1.09
    angle, scale, shear = authors_affine_params(16, torch.Generator().manual_seed(2))
    out = authors_affine(x, angle, scale, shear)
    same_as_pil = 0.0
    for i in range(len(x)):
        params = {"angle": float(angle[i]), "translate": [0, 0], "scale": float(scale[i])}
        params["shear"] = [float(shear[i]), 0.0]
        tv = TF.center_crop(TF.affine(TF.pad(x[i], 4, padding_mode="edge"), **params, fill=[0.0] * 3), 32)
        assert torch.equal(out[i], tv)
        pil = Image.fromarray((x[i] * 255).round().byte().permute(1, 2, 0).numpy())
        ref = T.CenterCrop(32)(TF.affine(T.Pad(4, padding_mode="edge")(pil), **params, fill=0))
        same_as_pil += (TF.to_tensor(ref) == out[i]).float().mean().item() / len(x)
    assert same_as_pil > 0.995
    # The identity parameters give the image back.
    ones = torch.ones(len(x), dtype=torch.float64)
    assert torch.equal(authors_affine(x, 0 * ones, ones, 0 * ones), x)


def test_svhn_reader_agrees_with_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets.svhn as tv_svhn
    from torchvision.transforms import ToTensor

    write_svhn(tmp_path, "train_32x32.mat", [10, 1, 9, 10])
    write_svhn(tmp_path, "test_32x32.mat", [3, 10])
    monkeypatch.setattr(tv_svhn.SVHN, "_check_integrity", lambda self: True)
    ds = load("svhn", tmp_path)
    tv = tv_svhn.SVHN(str(tmp_path), split="train")
    assert torch.equal(ds.train.labels, torch.from_numpy(tv.labels).long())
    assert torch.equal(ds.train.images, torch.from_numpy(tv.data).float() / 255.0)
    x, _ = tv_svhn.SVHN(str(tmp_path), split="train", transform=ToTensor())[2]
    assert torch.equal(ds.train.images[2], x)  # and the same as the reference's ToTensor() image


def test_svhn_missing_files_name_the_paths(tmp_path):
    write_svhn(tmp_path, "train_32x32.mat", [1])
    with pytest.raises(UsageError) as e:
        load("svhn", tmp_path)
    assert str((tmp_path / "test_32x32.mat").resolve()) in str(e.value)
    assert "train_32x32.mat\n" not in str(e.value)  # only the missing file is listed


# -- imagenet -------------------------------------------------------------------------


def write_image_folder(root: Path, classes: dict[str, int], size=(40, 30)) -> None:
    from PIL import Image

    for wnid, count in classes.items():
        (root / wnid).mkdir(parents=True)
        for i in range(count):
            colour = (10 * i, 100, 200) if wnid.endswith("1") else (250, 5 * i, 0)
            Image.new("RGB", size, colour).save(root / wnid / f"img{i}.png")


@pytest.mark.parametrize("under_imagenet", [True, False])
def test_imagenet_image_folder(tmp_path, under_imagenet):
    root = tmp_path / "imagenet" if under_imagenet else tmp_path
    classes = {"n0001": 3, "n0002": 2, "n0003": 2}
    write_image_folder(root / "train", classes)
    write_image_folder(root / "val", {k: 1 for k in classes})
    ds = load("imagenet", tmp_path, image_size=16)
    assert (ds.num_classes, ds.image_shape) == (3, (3, 16, 16))
    assert (len(ds.train), len(ds.test)) == (7, 3)
    x, y = ds.test[1]
    assert x.shape == (3, 16, 16) and int(y) == 1
    # ImageNet normalisation: a pure-red (250, 0, 0) image is far from [0, 1] after it.
    expected = (torch.tensor([250 / 255, 0, 0]) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225]
    )
    assert torch.allclose(x.mean((1, 2)), expected, atol=1e-3)
    xt, yt = ds.train[0]
    assert xt.shape == (3, 16, 16) and int(yt) == 0 and ds.augment is None
    small = load("imagenet", tmp_path, image_size=16, limit_train=3)
    assert sorted(int(small.train[i][1]) for i in range(3)) == [0, 1, 2]  # evenly spaced: every class


def test_imagenet_missing_and_mismatched_folders(tmp_path):
    with pytest.raises(UsageError) as e:
        load("imagenet", tmp_path)
    msg = str(e.value)
    assert (
        str((tmp_path / "imagenet" / "train").resolve()) in msg and str((tmp_path / "val").resolve()) in msg
    )
    assert "<wnid>" in msg
    write_image_folder(tmp_path / "train", {"a1": 1, "b2": 1})
    write_image_folder(tmp_path / "val", {"a1": 1})
    with pytest.raises(UsageError, match="only in train/: \\['b2'\\]"):
        load("imagenet", tmp_path)


# -- tiny300k -------------------------------------------------------------------------


def test_tiny300k_reads_the_npy_subsets(tmp_path):
    n = 40
    images = np.zeros((n, 32, 32, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)  # image k is marked with k at (h=0, w=0, c=0)
    images[:, 6, 2, 1] = 255
    np.save(tmp_path / "300K_random_images.npy", images)
    ds = load("tiny300k", tmp_path, n_train=25, n_test=10, seed=1)
    assert stitchbench.get_plugin("tiny300k").auxiliary
    assert (ds.num_classes, ds.image_shape) == (1, (3, 32, 32))
    assert ds.train.images.shape == (25, 3, 32, 32) and ds.test.images.shape == (10, 3, 32, 32)
    assert torch.all(ds.train.images[:, 1, 6, 2] == 1.0)  # HWC pixel (6, 2, 1) is CHW (1, 6, 2)
    ids_train = (ds.train.images[:, 0, 0, 0] * 255).round().long().tolist()
    ids_test = (ds.test.images[:, 0, 0, 0] * 255).round().long().tolist()
    assert ids_train == sorted(ids_train) and not set(ids_train) & set(ids_test)
    again = load("tiny300k", tmp_path, n_train=25, n_test=10, seed=1)
    assert torch.equal(again.train.images, ds.train.images)
    with pytest.raises(UsageError, match="holds 40 images"):
        load("tiny300k", tmp_path, n_train=35, n_test=10)


def test_tiny300k_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(UsageError) as e:
        load("tiny300k", tmp_path)
    msg = str(e.value)
    assert str((tmp_path / "300K_random_images.npy").resolve()) in msg
    assert "https://people.eecs.berkeley.edu/~hendrycks/300K_random_images.npy" in msg


# -- common ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "svhn", "imagenet", "tiny300k"])
def test_disk_sets_need_a_data_dir(name):
    plugin = stitchbench.get_plugin(name)
    assert plugin.needs_data_dir
    with pytest.raises(UsageError, match="needs --data-dir"):
        plugin.load(plugin.Params(), None)


@pytest.mark.parametrize("name", ["digits", "cifar10", "svhn", "imagenet", "noise", "tiny300k"])
def test_registered_with_a_description(name):
    plugin = stitchbench.get_plugin(name)
    assert plugin.kind == "dataset" and plugin.name == name
    assert plugin.describe() and "\n" not in plugin.describe()
    with pytest.raises(Exception, match="extra"):
        plugin.Params(no_such_param=1)
