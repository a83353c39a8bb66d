"""Tests for selfsup.data: format detection, decoding, colour conversion and the decode cache.

All data is tiny and generated in tmp_path; the cache always goes to tmp_path / "cache".
"""
import gzip
import io
import logging
import os
import pickle
import sys
import types

import numpy as np
import pytest
from PIL import Image

from selfsup.data import DATASET_NAMES, CachedImages, DataError, load_images, open_source
from selfsup.data import sources


def save(path, img, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def solid(color, size=(20, 12), mode="RGB"):
    return Image.new(mode, size, color)


def load(tmp_path, spec, split="train", image_size=8, **kwargs):
    return load_images(str(spec), split, image_size=image_size, cache_dir=str(tmp_path / "cache"), progress=False, **kwargs)


def uniform(images, index):
    """The single colour of images[index] (asserts the image is uniform)."""
    img = np.asarray(images[index])
    assert (img == img[0, 0]).all()
    return tuple(int(v) for v in img[0, 0])


# --------------------------------------------------------------------------- image folders

@pytest.fixture
def labeled(tmp_path):
    root = tmp_path / "labeled"
    save(root / "dog" / "a.png", solid((10, 200, 30)))
    save(root / "dog" / "b.jpg", solid((250, 250, 250), (40, 40)))
    save(root / "cat" / "x.png", solid((0, 0, 255), (40, 40)))
    save(root / "cat" / "deep" / "y.png", solid((5, 6, 7), (12, 20)))
    save(root / "bird" / "z.PNG", solid((100, 100, 100)))
    (root / "notes.txt").write_text("not an image")
    return root


def test_labeled_image_folder(tmp_path, labeled):
    data = load(tmp_path, labeled, image_size=10)
    assert isinstance(data, CachedImages)
    assert data.classes == ["bird", "cat", "dog"] and data.num_classes == 3
    assert data.images.shape == (5, 10, 10, 3) and data.images.dtype == np.uint8
    names = [os.path.relpath(f, labeled) for f in data.files]
    assert names == ["bird/z.PNG", "cat/deep/y.png", "cat/x.png", "dog/a.png", "dog/b.jpg"]
    assert data.labels.tolist() == [0, 1, 1, 2, 2] and data.labels.dtype == np.int64
    assert uniform(data.images, 3) == (10, 200, 30)  # PNG 20x12 -> exact colour after resize/crop
    assert uniform(data.images, 1) == (5, 6, 7)
    assert np.abs(np.asarray(data.images[4], dtype=int) - 250).max() <= 2  # JPEG: nearly exact
    assert data.skipped == [] and data.source == f"imagefolder:{labeled}"


def test_flat_folder_is_unlabeled(tmp_path):
    root = tmp_path / "flat"
    for i in range(3):
        save(root / f"{i}.png", solid((i, i, i)))
    data = load(tmp_path, root)
    assert data.labels.tolist() == [-1, -1, -1] and data.classes == [] and data.num_classes == 0
    assert [uniform(data.images, i) for i in range(3)] == [(0, 0, 0), (1, 1, 1), (2, 2, 2)]


def test_split_subfolder(tmp_path):
    root = tmp_path / "ds"
    save(root / "train" / "a" / "1.png", solid((1, 1, 1)))
    save(root / "train" / "b" / "2.png", solid((2, 2, 2)))
    save(root / "test" / "a" / "3.png", solid((3, 3, 3)))
    test = load(tmp_path, root, "test")
    assert len(test) == 1 and test.classes == ["a"] and uniform(test.images, 0) == (3, 3, 3)
    assert test.source == f"imagefolder:{root / 'test'}"
    train = load(tmp_path, root, "train")
    assert train.classes == ["a", "b"] and train.labels.tolist() == [0, 1]
    with pytest.raises(DataError, match="available splits: train, test"):
        load(tmp_path, root, "val")


def test_bad_files_are_skipped(tmp_path, caplog):
    root = tmp_path / "bad"
    save(root / "good.png", solid((9, 8, 7)))
    save(root / "good2.jpg", solid((200, 200, 200), (40, 40)))
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("hello, I am not a PNG")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    (root / "readme.txt").write_text("ignored")
    with caplog.at_level(logging.WARNING, logger="selfsup.data"):
        data = load(tmp_path, root)
    assert len(data) == 2 and uniform(data.images, 0) == (9, 8, 7)
    assert [os.path.basename(f) for f in data.files] == ["good.png", "good2.jpg"]
    skipped = {os.path.basename(p): reason for p, reason in data.skipped}
    assert sorted(skipped) == ["corrupt.png", "empty.png", "text.png", "truncated.jpg"]
    assert all(reason for reason in skipped.values())
    assert "truncated" in skipped["truncated.jpg"]
    assert "skipped 4 of 6 files" in caplog.text


def test_colour_conversions(tmp_path):
    root = tmp_path / "modes"
    save(root / "a_gray.png", solid(77, (8, 8), "L"))
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)  # left half opaque red
    rgba[:, 4:] = (0, 0, 0, 0)  # right half fully transparent -> white
    rgba[0, 4:] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    save(root / "b_rgba.png", Image.fromarray(rgba, "RGBA"))
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    save(root / "c_palette.png", pal)
    trans = Image.new("P", (8, 8), 0)
    trans.putpalette([1, 2, 3] * 256)
    save(root / "d_palette_transparent.png", trans, transparency=0)
    gray16 = np.zeros((8, 8), np.uint16)
    gray16[:, :4], gray16[:, 4:] = 65535, 32896
    img16 = Image.fromarray(gray16)
    assert img16.mode.startswith("I;16")
    save(root / "e_gray16.png", img16)
    save(root / "f_cmyk.tif", solid((0, 255, 255, 0), (8, 8), "CMYK"))
    la = Image.new("LA", (8, 8), (50, 0))
    save(root / "g_la.png", la)
    data = load(tmp_path, root, image_size=8)
    assert data.skipped == [] and len(data) == 7
    gray, rgba_out, palette, pal_t, g16, cmyk, la_out = (np.asarray(data.images[i]) for i in range(7))
    assert (gray == 77).all()
    assert (rgba_out[1:, :4] == (255, 0, 0)).all() and (rgba_out[1:, 4:] == 255).all()
    assert (rgba_out[0, 4:] == 127).all()
    assert (palette == (12, 34, 56)).all()
    assert (pal_t == 255).all()
    assert (g16[:, :4] == 255).all() and (g16[:, 4:] == 128).all()
    assert (cmyk == (255, 0, 0)).all()
    assert (la_out == 255).all()


def test_to_rgb_mode_i():
    small = Image.fromarray(np.full((2, 2), 200, np.int32), "I")
    large = Image.fromarray(np.full((2, 2), 65535, np.int32), "I")
    assert (sources.to_rgb(small) == 200).all() and (sources.to_rgb(large) == 255).all()


def test_fit_square_center_crop():
    img = np.zeros((10, 30, 3), np.uint8)
    img[:, 8:22] = 255  # the centre square (columns 10..19) and a margin are white, the sides black
    out = sources.fit_square(img, 5)
    assert out.shape == (5, 5, 3) and (out == 255).all()
    tall = sources.fit_square(img.transpose(1, 0, 2), 5)  # 30x10: rows 10..19 kept
    assert tall.shape == (5, 5, 3) and (tall == 255).all()
    assert sources.fit_square(out, 5) is out  # already the right size: untouched


# --------------------------------------------------------------------------- cache

def test_cache_reuse_and_rebuild(tmp_path, labeled, monkeypatch):
    first = load(tmp_path, labeled)
    assert isinstance(first.images, np.memmap) and not first.images.flags.writeable
    with pytest.raises(ValueError):
        first.images[0, 0, 0, 0] = 1
    cache = tmp_path / "cache"
    (u8,) = cache.glob("*.u8")
    mtime = u8.stat().st_mtime_ns

    def fail(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(sources, "decode_image", fail)
    second = load(tmp_path, labeled)
    assert u8.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(second.images, first.images)
    assert second.files == first.files and second.classes == first.classes

    calls = []
    monkeypatch.setattr(sources, "decode_image", lambda path, size: calls.append(path) or np.zeros(
        ((size, size) if isinstance(size, int) else tuple(size)) + (3,), np.uint8))  # a side or a (h, w) frame
    target = labeled / "dog" / "a.png"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    rebuilt = load(tmp_path, labeled)
    assert len(calls) == 5 and len(rebuilt) == 5
    assert len(list(cache.glob("*.u8"))) == 1 and len(list(cache.glob("*.json"))) == 1  # stale entry removed

    save(labeled / "bird" / "new.png", solid((1, 2, 3)))
    assert len(load(tmp_path, labeled)) == 6 and len(calls) == 11
    assert not list(cache.glob(".*"))  # no temporary files left


def test_cache_dir_from_environment(tmp_path, labeled, monkeypatch):
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path / "envcache"))
    load_images(str(labeled), image_size=4, progress=False)
    assert len(list((tmp_path / "envcache").glob("*.json"))) == 1


def test_subset(tmp_path, labeled):
    data = load(tmp_path, labeled)
    sub = data.subset(np.array([4, 0]))
    assert len(sub) == 2 and sub.labels.tolist() == [2, 0] and sub.files == [data.files[4], data.files[0]]
    np.testing.assert_array_equal(sub.images[1], data.images[0])
    masked = data.subset(data.labels == 1)
    assert masked.labels.tolist() == [1, 1] and masked.classes == data.classes


# --------------------------------------------------------------------------- array formats

def cifar_images(n, seed):
    """NHWC uint8 images with a position-dependent pattern: R = col + seed*n, G = row, B = 100 + index."""
    rows, cols = np.mgrid[0:32, 0:32]
    imgs = np.zeros((n, 32, 32, 3), np.uint8)
    for i in range(n):
        imgs[i, :, :, 0] = (cols + seed * 10) % 256
        imgs[i, :, :, 1] = rows
        imgs[i, :, :, 2] = 100 + i
    return imgs


def cifar_rows(imgs):
    return imgs.transpose(0, 3, 1, 2).reshape(len(imgs), 3072)  # R plane, G plane, B plane, each row-major


def dump(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


@pytest.fixture
def cifar10(tmp_path):
    folder = tmp_path / "c10" / "cifar-10-batches-py"
    for b in range(1, 6):
        dump(folder / f"data_batch_{b}", {b"data": cifar_rows(cifar_images(2, b)), b"labels": [b, b + 1]})
    dump(folder / "test_batch", {b"data": cifar_rows(cifar_images(3, 0)), b"labels": [9, 8, 7]})
    dump(folder / "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)]})
    return folder


def test_cifar10(tmp_path, cifar10):
    train = load(tmp_path, cifar10.parent, image_size=32)  # parent folder is accepted
    assert train.images.shape == (10, 32, 32, 3)
    assert train.labels.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert train.classes == [f"class{i}" for i in range(10)]
    assert train.files[:3] == ["data_batch_1#0", "data_batch_1#1", "data_batch_2#0"]
    assert tuple(train.images[2, 3, 5]) == (5 + 20, 3, 100)  # batch 2, image 0, row 3, col 5
    assert tuple(train.images[1, 31, 0]) == (10, 31, 101)
    test = load(tmp_path, cifar10, "test", image_size=32)
    assert test.labels.tolist() == [9, 8, 7] and test.source == f"cifar10:{cifar10}[test]"
    assert tuple(test.images[2, 7, 4]) == (4, 7, 102)
    small = load(tmp_path, cifar10, "test", image_size=16)
    assert small.images.shape == (3, 16, 16, 3)
    with pytest.raises(DataError, match="available splits: train, test"):
        load(tmp_path, cifar10, "unlabeled")


def test_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    dump(folder / "train", {b"data": cifar_rows(cifar_images(4, 1)), b"fine_labels": [0, 99, 5, 42], b"coarse_labels": [0] * 4})
    dump(folder / "test", {b"data": cifar_rows(cifar_images(1, 2)), b"fine_labels": [7], b"coarse_labels": [1]})
    dump(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)], b"coarse_label_names": [b"c"]})
    train = load(tmp_path, folder, image_size=32)
    assert train.labels.tolist() == [0, 99, 5, 42] and train.num_classes == 100 and train.classes[99] == "f99"
    assert tuple(train.images[3, 9, 2]) == (12, 9, 103)
    assert load(tmp_path, folder, "test", image_size=32).labels.tolist() == [7]


def test_cifar_pickle_refuses_code(tmp_path, cifar10):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    dump(cifar10 / "test_batch", {b"data": Evil(), b"labels": []})
    with pytest.raises(DataError, match="refusing"):
        load(tmp_path, cifar10, "test")


def stl_images(n):
    """NHWC images with R = row, G = col, B = index."""
    rows, cols = np.mgrid[0:96, 0:96]
    imgs = np.zeros((n, 96, 96, 3), np.uint8)
    imgs[..., 0], imgs[..., 1] = rows, cols
    imgs[..., 2] = np.arange(n)[:, None, None]
    return imgs


@pytest.fixture
def stl(tmp_path):
    folder = tmp_path / "s" / "stl10_binary"
    folder.mkdir(parents=True)
    for split, n in (("train", 3), ("test", 2), ("unlabeled", 2)):
        (folder / f"{split}_X.bin").write_bytes(stl_images(n).transpose(0, 3, 2, 1).tobytes())  # column-major
    (folder / "train_y.bin").write_bytes(bytes([1, 10, 4]))
    (folder / "test_y.bin").write_bytes(bytes([2, 3]))
    (folder / "class_names.txt").write_text("\n".join(f"name{i}" for i in range(10)) + "\n")
    return folder


def test_stl10(tmp_path, stl):
    train = load(tmp_path, stl.parent, image_size=96)
    assert train.images.shape == (3, 96, 96, 3) and train.labels.tolist() == [0, 9, 3]
    assert train.classes == [f"name{i}" for i in range(10)]
    assert tuple(train.images[2, 0, 5]) == (0, 5, 2) and tuple(train.images[1, 40, 7]) == (40, 7, 1)
    unlabeled = load(tmp_path, stl, "unlabeled", image_size=96)
    assert unlabeled.labels.tolist() == [-1, -1] and unlabeled.classes == train.classes
    both = load(tmp_path, stl, "train+unlabeled", image_size=32)
    assert both.images.shape == (5, 32, 32, 3) and both.labels.tolist() == [0, 9, 3, -1, -1]
    assert both.files[3] == "unlabeled_X.bin#0"
    with pytest.raises(DataError, match="available splits: train, test, unlabeled"):
        load(tmp_path, stl, "validation")


def write_idx(path, array, compress):
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_idx(folder, compress):
    imgs = (np.arange(3 * 8 * 8).reshape(3, 8, 8) * 3 % 256).astype(np.uint8)
    write_idx(folder / "train-images-idx3-ubyte", imgs, compress)
    write_idx(folder / "train-labels-idx1-ubyte", np.array([3, 1, 4]), compress)
    write_idx(folder / "t10k-images-idx3-ubyte", imgs[:2][:, ::-1], compress)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.array([5, 9]), compress)
    return imgs


@pytest.mark.parametrize("compress", [True, False])
def test_idx(tmp_path, compress):
    imgs = make_idx(tmp_path / "mnist" / "raw", compress)
    train = load(tmp_path, tmp_path / "mnist", image_size=8)
    assert train.labels.tolist() == [3, 1, 4] and train.classes == [str(i) for i in range(10)]
    np.testing.assert_array_equal(train.images, np.repeat(imgs[..., None], 3, axis=3))
    assert train.files[0] == "train-images-idx3-ubyte#0"
    test = load(tmp_path, tmp_path / "mnist" / "raw", "test", image_size=8)
    assert test.labels.tolist() == [5, 9] and test.images[1, 0, 0, 0] == imgs[1, 7, 0]
    assert load(tmp_path, tmp_path / "mnist", image_size=28).images.shape == (3, 28, 28, 3)


def test_digits(tmp_path):
    train = load(tmp_path, "digits", image_size=8)
    test = load(tmp_path, "digits", "test", image_size=8)
    assert len(train) == 1347 and len(test) == 450
    assert not set(train.files) & set(test.files)
    assert set(train.labels.tolist()) == set(range(10)) == set(test.labels.tolist())
    assert train.images.max() == 255 and train.images.min() == 0
    assert (train.images[..., 0] == train.images[..., 2]).all()
    assert load(tmp_path, "Digits", "test", image_size=32).images.shape == (450, 32, 32, 3)


# --------------------------------------------------------------------------- named datasets

def test_named_dataset_from_data_root(tmp_path, cifar10, monkeypatch):
    monkeypatch.setenv("SELFSUP_DATA", str(cifar10.parent))
    data = load(tmp_path, "cifar10", "test", image_size=32)
    assert data.labels.tolist() == [9, 8, 7]
    monkeypatch.setenv("SELFSUP_DATA", str(tmp_path / "nothing"))
    with pytest.raises(DataError, match=r"'cifar10' was not found.*download=True.*--data PATH"):
        load(tmp_path, "cifar10")


def test_named_dataset_download(tmp_path, monkeypatch):
    root = tmp_path / "root"
    monkeypatch.setenv("SELFSUP_DATA", str(root))
    calls = []

    def fake_mnist(path, train, download):
        calls.append((path, train, download))
        make_idx(root / "MNIST" / "raw", compress=True)

    def broken(*args, **kwargs):
        raise OSError("network unreachable")

    fake = types.ModuleType("torchvision.datasets")
    fake.MNIST, fake.FashionMNIST = fake_mnist, broken
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake)
    data = load(tmp_path, "mnist", image_size=8, download=True)
    assert calls == [(str(root), True, True)] and data.labels.tolist() == [3, 1, 4]
    assert load(tmp_path, "MNIST", "test", image_size=8, download=True).labels.tolist() == [5, 9]
    assert len(calls) == 1  # present now: not downloaded again
    with pytest.raises(DataError, match="downloading 'fashion_mnist'.*network unreachable"):
        load(tmp_path, "fashion-mnist", download=True)


# --------------------------------------------------------------------------- errors

def test_errors(tmp_path, labeled):
    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(DataError, match="does not exist") as err:
        load(tmp_path, missing)
    assert str(missing) in str(err.value)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"no image files found under .*empty \(looked for .jpg") as err:
        load(tmp_path, empty)
    assert "readme.txt" in str(err.value)
    with pytest.raises(DataError, match="imagenet2") as err:
        load(tmp_path, "imagenet2")
    assert all(name in str(err.value) for name in DATASET_NAMES)
    with pytest.raises(DataError, match=f"split 'test' is not available in image folder {labeled}"):
        load(tmp_path, labeled, "test")
    with pytest.raises(DataError, match="available splits: train, test"):
        load(tmp_path, "digits", "validation")
    with pytest.raises(DataError, match="is a file"):
        load(tmp_path, labeled / "dog" / "a.png")
    with pytest.raises(DataError, match="image_size"):
        load(tmp_path, labeled, image_size=0)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_errors_come_before_decoding(tmp_path, labeled, monkeypatch):
    monkeypatch.setattr(sources, "decode_image", lambda *a: pytest.fail("decoded"))
    with pytest.raises(DataError):
        load(tmp_path, labeled, "val")
    source = open_source(str(labeled))
    assert source.kind == "imagefolder" and len(source) == 5 and source.classes == ["bird", "cat", "dog"]
    assert source.fingerprint() == open_source(str(labeled)).fingerprint()


def test_parallel_decoding_gives_the_same_cache_and_skips_the_same_files(tmp_path, monkeypatch):
    """Image folders decode in worker processes (``SELFSUP_DECODE_WORKERS``, default one per core from
    2,000 files on): the same images, labels, file order and skipped files as in one process."""
    from conftest import make_folder

    from selfsup.data import load_images

    root = make_folder(tmp_path / "imgs", 6, size=12, seed=3)
    (root / "class0" / "broken.png").write_bytes(b"not a png at all")
    monkeypatch.setenv("SELFSUP_DECODE_WORKERS", "1")
    one = load_images(str(root), image_size=12, cache_dir=str(tmp_path / "c1"), progress=False)
    monkeypatch.setenv("SELFSUP_DECODE_WORKERS", "2")
    two = load_images(str(root), image_size=12, cache_dir=str(tmp_path / "c2"), progress=False)
    assert np.array_equal(np.asarray(one.images), np.asarray(two.images)) and np.array_equal(one.labels, two.labels)
    assert one.files == two.files and len(one) == 24
    assert [p for p, _ in two.skipped] == [p for p, _ in one.skipped] and len(two.skipped) == 1


def test_parallel_decoding_from_the_command_line(tmp_path):
    """``python -m selfsup`` spawns its decoding workers without re-running the command in them."""
    import subprocess
    import sys

    from conftest import make_folder

    root = make_folder(tmp_path / "imgs", 3, size=12, seed=4)
    env = {**os.environ, "SELFSUP_DECODE_WORKERS": "2", "SELFSUP_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "selfsup", "embed", "random:convnet", "--data", str(root), "--out",
                        str(tmp_path / "emb"), "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("decoding 12 images") == 1  # one decode, by the parent: the workers ran no command
    assert (tmp_path / "emb.npy").exists()


def test_a_script_without_a_main_guard_decodes_instead_of_hanging(tmp_path):
    """A user's script that calls selfsup at import time (no ``if __name__ == "__main__":``) makes every
    spawned decoding worker re-run it and die; the decode then finishes in the script's own process with
    a warning that names the fix (a ``multiprocessing.Pool`` respawned such workers forever)."""
    import subprocess

    from conftest import make_folder

    root = make_folder(tmp_path / "imgs", 4, size=12, seed=5)
    script = tmp_path / "unguarded.py"
    script.write_text("from selfsup.data import load_images\n"
                      f"imgs = load_images({str(root)!r}, image_size=12, cache_dir={str(tmp_path / 'c')!r}, "
                      "progress=False)\nprint('decoded', len(imgs))\n")
    env = {**os.environ, "SELFSUP_DECODE_WORKERS": "2"}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0 and "decoded 16" in r.stdout, r.stderr[-2000:]
    assert 'under `if __name__ == "__main__":`' in r.stderr
