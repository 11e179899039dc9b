"""inrfmt.sources: every source kind, every PIL mode, labels, bad items, the restricted unpickler."""

from __future__ import annotations

import concurrent.futures
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inrfmt.errors import InrUsageError
from inrfmt import sources
from inrfmt.sources import Sample, SourceItemError, open_source, to_rgb8
from tests.badfiles import GOOD_IMAGES, make_bad_input_folder, png_bytes, running_as_root

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
PHOTOS = REPO / "data" / "photos"


def sample_images(n: int, side: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """n real images (bundled Fashion-MNIST, as RGB, padded to side x side) and their labels."""
    src = open_source(SAMPLE)
    step = len(src) // n
    images, labels = [], []
    for i in range(0, step * n, step):
        s = src.load(i)
        img = np.zeros((side, side, 3), np.uint8)
        img[2:30, 2:30] = s.image[:, :, :3]
        img[..., 1] //= 2  # make the channels differ so a channel mix-up shows
        img[..., 2] = 255 - img[..., 2]
        images.append(img)
        labels.append(s.label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# bundled sample data


def test_bundled_sample_tree():
    src = open_source(SAMPLE)
    assert src.kind == "imagefolder"
    assert src.classes == sorted(src.classes) and len(src.classes) == 10
    assert len(src) == 200
    counts = np.bincount([src.load(i).label for i in range(0, len(src), 7)], minlength=10)
    assert (counts > 0).all()
    s = src.load(0)
    assert s.image.shape == (28, 28, 3) and s.image.dtype == np.uint8
    assert (s.image[..., 0] == s.image[..., 1]).all()  # grayscale replicated
    total = sum(p.stat().st_size for d in (SAMPLE, PHOTOS) for p in d.rglob("*") if p.is_file())
    assert total < 5_000_000
    assert (REPO / "data" / "LICENSE.md").is_file()


def test_bundled_photos_are_colour_and_non_square():
    src = open_source(PHOTOS)
    shapes = set()
    for i in range(len(src)):
        img = src.load(i).image
        assert img.dtype == np.uint8 and img.ndim == 3 and max(img.shape[:2]) <= 256
        assert np.abs(img[..., 0].astype(int) - img[..., 2]).mean() > 3  # real colour
        shapes.add(img.shape[:2])
    assert any(h != w for h, w in shapes)


# --------------------------------------------------------------------------------------------------
# image folder: listing, labels, keys


def _write(path: Path, array: np.ndarray, fmt: str = "PNG", **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **kw)
    return path


def test_imagefolder_labels_order_and_extensions(tmp_path):
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)  # noqa: E731
    _write(tmp_path / "zebra" / "b.PNG", img())
    _write(tmp_path / "zebra" / "a.JpEg", img(), "JPEG")
    _write(tmp_path / "apple" / "z.bmp", img(), "BMP")
    _write(tmp_path / "apple" / "y.webp", img(), "WEBP", lossless=True)
    _write(tmp_path / "mango" / "x.jpg", img(), "JPEG")
    (tmp_path / "mango" / "notes.txt").write_text("not an image")
    (tmp_path / "mango" / ".hidden.jpg").write_bytes(b"")
    (tmp_path / ".git").mkdir()
    src = open_source(tmp_path)
    assert src.classes == ["apple", "mango", "zebra"]
    assert [src.key(i) for i in range(len(src))] == ["apple/y.webp", "apple/z.bmp", "mango/x.jpg", "zebra/a.JpEg", "zebra/b.PNG"]
    assert [src.load(i).label for i in range(len(src))] == [0, 0, 1, 2, 2]
    assert all(src.load(i).image.shape == (5, 7, 3) for i in range(len(src)))
    assert src.load(-1).key == "zebra/b.PNG"
    with pytest.raises(IndexError):
        src.load(5)


def test_imagefolder_flat_is_unlabelled(tmp_path):
    arr = np.full((4, 6, 3), 77, np.uint8)
    _write(tmp_path / "b.png", arr)
    _write(tmp_path / "a.png", arr)
    src = open_source(tmp_path)
    assert src.classes == []
    assert [src.load(i) for i in range(2)][0].key == "a.png"
    assert all(src.load(i).label == -1 for i in range(2))
    np.testing.assert_array_equal(src.load(1).image, arr)


def test_imagefolder_reads_nested_folders_tiff_and_gif_and_names_what_it_does_not_read(tmp_path):
    # The class is the top-level folder, images at any depth below it (torchvision's ImageFolder); TIFF
    # and GIF (first frame) are read; anything else is counted and named, never dropped silently.
    rng = np.random.default_rng(1)
    img = lambda: rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)  # noqa: E731
    _write(tmp_path / "a" / "1.jpg", img(), "JPEG")
    _write(tmp_path / "a" / "2.png", img())
    _write(tmp_path / "a" / "deep" / "er" / "3.webp", img(), "WEBP", lossless=True)
    _write(tmp_path / "b" / "sub" / "x.jpg", img(), "JPEG")
    _write(tmp_path / "b" / "4.bmp", img(), "BMP")
    _write(tmp_path / "c" / "t.tif", img(), "TIFF")
    _write(tmp_path / "c" / "u.TIFF", img(), "TIFF")
    first, second = img(), img()
    frames = [Image.fromarray(first).convert("P"), Image.fromarray(second).convert("P")]
    frames[0].save(tmp_path / "c" / "anim.gif", save_all=True, append_images=frames[1:])
    _write(tmp_path / "c" / "deep" / "g.gif", img(), "GIF")
    _write(tmp_path / "c" / "z.png", img())
    (tmp_path / "b" / "sub" / "notes.txt").write_text("x")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "README.md").write_text("x")
    (tmp_path / "c" / ".cache").mkdir()
    src = open_source(tmp_path)
    assert len(src) == 10 and src.classes == ["a", "b", "c"]
    assert [src.key(i) for i in range(len(src))] == [
        "a/1.jpg", "a/2.png", "a/deep/er/3.webp", "b/4.bmp", "b/sub/x.jpg", "c/anim.gif", "c/deep/g.gif", "c/t.tif",
        "c/u.TIFF", "c/z.png"]
    assert src.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    gif = src.load(5).image
    assert gif.shape == (6, 5, 3)
    np.testing.assert_array_equal(gif, np.asarray(frames[0].convert("RGB")))  # the first frame
    assert src.load(7).image.shape == (6, 5, 3)
    unread = {u["key"]: u["reason"] for u in src.unread}
    assert set(unread) == {"README.md", "a/.DS_Store", "b/sub/notes.txt", "c/.cache/"} and src.unread_count == 4
    assert unread["a/.DS_Store"] == "hidden" and ".txt" in unread["b/sub/notes.txt"]


def test_imagefolder_usage_errors(tmp_path):
    with pytest.raises(InrUsageError, match="SRC not found: .*nope"):
        open_source(tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(InrUsageError, match="no images found in SRC .*empty"):
        open_source(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    _write(mixed / "cls" / "a.png", np.zeros((2, 2, 3), np.uint8))
    _write(mixed / "loose.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(InrUsageError, match="class folders and also 1 images.*loose.png"):
        open_source(mixed)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InrUsageError, match="notes.txt: unrecognised content"):
        open_source(tmp_path / "notes.txt")
    with pytest.raises(InrUsageError, match="background"):
        open_source(mixed / "cls", background=(0, 0))


# --------------------------------------------------------------------------------------------------
# pixel modes


def _roundtrip(tmp_path, img: Image.Image, name="x.png", fmt=None, background=(255, 255, 255), **save):
    path = tmp_path / "modes" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **save)
    src = open_source(path.parent, background=background)
    assert len(src) == 1
    out = src.load(0)
    assert out.image.dtype == np.uint8 and out.image.ndim == 3 and out.image.shape[2] == 3
    assert out.image.flags["C_CONTIGUOUS"]
    path.unlink()
    return out.image


def test_mode_rgb_and_l_and_bilevel(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_roundtrip(tmp_path, Image.fromarray(rgb)), rgb)
    gray = np.arange(54, dtype=np.uint8).reshape(6, 9) * 4
    out = _roundtrip(tmp_path, Image.fromarray(gray, "L"))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))
    bits = Image.fromarray((gray > 100).astype(np.uint8) * 255, "L").convert("1")
    out = _roundtrip(tmp_path, bits)
    np.testing.assert_array_equal(out[..., 0], np.where(gray > 100, 255, 0))


def test_mode_rgba_la_composited_on_background(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = [[0, 255, 128], [64, 255, 0]]
    out = _roundtrip(tmp_path, Image.fromarray(rgba, "RGBA"))
    a = rgba[..., 3].astype(int)
    expect_r = (200 * a + 255 * (255 - a) + 127) // 255
    expect_g = (0 * a + 255 * (255 - a) + 127) // 255
    np.testing.assert_array_equal(out[..., 0], expect_r)
    np.testing.assert_array_equal(out[..., 1], expect_g)
    black = _roundtrip(tmp_path, Image.fromarray(rgba, "RGBA"), background=(0, 0, 0))
    np.testing.assert_array_equal(black[..., 0], (200 * a + 127) // 255)
    assert (black[..., 1:] == 0).all()
    la = np.stack([np.full((2, 3), 100, np.uint8), rgba[..., 3]], axis=-1)
    out = _roundtrip(tmp_path, Image.fromarray(la, "LA"), background=(0, 255, 0))
    np.testing.assert_array_equal(out[..., 0], (100 * a + 127) // 255)
    np.testing.assert_array_equal(out[..., 1], (100 * a + 255 * (255 - a) + 127) // 255)


def test_mode_palette_with_and_without_transparency(tmp_path):
    idx = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    pal = Image.fromarray(idx, "P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    out = _roundtrip(tmp_path, pal)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 2], [0, 0, 255])
    out = _roundtrip(tmp_path, pal, transparency=1, background=(10, 20, 30))  # index 1 (green) transparent
    np.testing.assert_array_equal(out[0, 1], [10, 20, 30])
    np.testing.assert_array_equal(out[1, 0], [0, 0, 255])


def test_mode_16bit_gray_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535], [1000, 40000, 65280, 128]], np.uint16)
    img = Image.fromarray(values)  # Pillow: mode I;16
    assert img.mode.startswith("I;16")
    out = _roundtrip(tmp_path, img)
    expect = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expect)
    assert out[0, 3, 0] == 255 and out[0, 1, 0] == 1 and out[0, 2, 0] == 128
    # mode "I" (32-bit) holding 16-bit data, and out-of-range values clipped
    i32 = Image.fromarray(np.array([[0, 65535, 70000, -5]], np.int32), "I")
    np.testing.assert_array_equal(to_rgb8(i32)[0, :, 0], [0, 255, 255, 0])
    f = Image.fromarray(np.array([[-1.0, 0.4, 127.6, 300.0]], np.float32), "F")
    np.testing.assert_array_equal(to_rgb8(f)[0, :, 0], [0, 0, 128, 255])


def test_mode_cmyk_jpeg(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = [200, 30, 30]
    rgb[:, 8:] = [30, 30, 200]
    cmyk = Image.fromarray(rgb).convert("CMYK")
    path = tmp_path / "cmyk" / "c.jpg"
    path.parent.mkdir()
    cmyk.save(path, quality=95)
    with Image.open(path) as stored:
        assert stored.mode == "CMYK"
    out = open_source(path.parent).load(0).image
    assert np.abs(out[4, 2].astype(int) - [200, 30, 30]).max() < 20
    assert np.abs(out[4, 13].astype(int) - [30, 30, 200]).max() < 20


def test_exif_orientation_applied(tmp_path):
    rgb = np.zeros((10, 20, 3), np.uint8)  # 10 high, 20 wide; left half red
    rgb[:, :10] = [255, 0, 0]
    img = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "exif" / "r.jpg"
    path.parent.mkdir()
    img.save(path, quality=95, exif=exif.tobytes())
    out = open_source(path.parent).load(0).image
    assert out.shape == (20, 10, 3)
    assert out[2, 5, 0] > 200 and out[2, 5, 2] < 60  # the red (left) half is on top after turning CW
    assert out[17, 5, 0] < 60


def test_pixel_cap(tmp_path, monkeypatch):
    path = _write(tmp_path / "cap" / "big.png", np.zeros((20, 30, 3), np.uint8))
    src = open_source(path.parent)
    assert src.load(0).image.shape == (20, 30, 3)
    monkeypatch.setattr(sources, "MAX_IMAGE_PIXELS", 599)
    with pytest.raises(SourceItemError, match=r"big.png: 30x20 = 600 pixels is over the 599-pixel cap"):
        src.load(0)


# --------------------------------------------------------------------------------------------------
# bad items


def test_bad_items_raise_source_item_error_naming_the_file(tmp_path):
    bad = make_bad_input_folder(tmp_path)
    expected = {"truncated_jpeg", "truncated_png", "zero_byte", "random_bytes", "bad_crc_png", "directory",
                "bomb_png", "zero_size_png", "unsupported_format"}
    assert expected <= set(bad)
    assert ("unreadable" in bad) == (not running_as_root())
    src = open_source(tmp_path)
    assert src.classes == ["bad", "good"]
    by_key = {src.key(i): i for i in range(len(src))}
    for kind, path in bad.items():
        key = f"bad/{path.name}"
        with pytest.raises(SourceItemError) as err:
            src.load(by_key[key])
        assert err.value.key == key and key in str(err.value), kind
        assert err.value.reason and "\n" not in str(err.value)
    good = [src.load(by_key[f"good/good_{i}.png"]) for i in range(GOOD_IMAGES)]
    assert all(s.label == 1 and s.image.shape == (8, 8, 3) for s in good)
    reason = lambda k: pytest.raises(SourceItemError, src.load, by_key[f"bad/{bad[k].name}"]).value.reason  # noqa: E731
    assert "empty" in reason("zero_byte")
    assert "directory" in reason("directory")
    assert "10000000000 pixels is over the" in reason("bomb_png")
    assert "corrupt PNG file: broken PNG file (bad header checksum" in reason("bad_crc_png")
    assert "not a JPEG, PNG, WebP, BMP, TIFF or GIF" in reason("unsupported_format") and "not a JPEG" in reason("random_bytes")
    assert "truncated" in reason("truncated_jpeg")


def _load_reason(src, i) -> str:
    try:
        src.load(i)
    except SourceItemError as e:
        return e.reason
    return "loaded"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to drop root")
def test_unreadable_file(request):
    """A mode-000 file. Root reads any file, so as root the load runs in a forked child that drops to
    the 'nobody' uid first (make_bad_input_folder leaves this kind out when run as root)."""
    # outside pytest's tmp tree, whose parent folders are mode 0700 (no way through for 'nobody')
    root = Path(tempfile.mkdtemp(prefix="inrfmt-perm-"))
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    (root / "c").mkdir(parents=True)
    path = root / "c" / "locked.png"
    path.write_bytes(png_bytes(np.zeros((4, 4, 3), np.uint8)))
    path.chmod(0)
    src = open_source(root)
    if not running_as_root():
        assert "cannot read" in _load_reason(src, 0)
        return
    for p in (root, root / "c"):
        p.chmod(0o755)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, _load_reason(src, 0).encode()[:500])
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        reason = f.read().decode()
    os.waitpid(pid, 0)
    assert "cannot read" in reason and "ermission" in reason, reason


# --------------------------------------------------------------------------------------------------
# CIFAR pickles


def _cifar_batch(images: np.ndarray, labels: np.ndarray, fine: bool, py2_keys: bool = True) -> dict:
    k = (lambda s: s.encode()) if py2_keys else (lambda s: s)  # CIFAR's own files have bytes keys
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # rows: R plane, G plane, B plane
    return {
        k("batch_label"): b"batch",
        k("fine_labels" if fine else "labels"): [int(v) for v in labels],
        k("coarse_labels") if fine else k("filenames"): [0] * len(labels) if fine else [b"f.png"] * len(labels),
        k("data"): np.ascontiguousarray(data),
    }


def _dump(obj, path: Path, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def test_cifar10_folder_reads_training_batches(tmp_path):
    images, labels = sample_images(12)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    _dump(_cifar_batch(images[:5], labels[:5], False), d / "data_batch_1")
    _dump(_cifar_batch(images[5:9], labels[5:9], False), d / "data_batch_2")
    _dump(_cifar_batch(images[9:], labels[9:], False, py2_keys=False), d / "test_batch", protocol=4)
    names = [f"class{i}".encode() for i in range(10)]
    _dump({b"label_names": names, b"num_cases_per_batch": 5}, d / "batches.meta")
    src = open_source(d)
    assert src.kind == "cifar" and len(src) == 9  # the folder gives the training split only
    assert src.classes == [f"class{i}" for i in range(10)]
    for i in range(9):
        s = src.load(i)
        np.testing.assert_array_equal(s.image, images[i])
        assert s.label == labels[i]
    assert src.key(6) == "data_batch_2#1"
    assert src._cache[0] == 1  # at most one batch's arrays held
    src.load(0)
    assert src._cache[0] == 0
    test = open_source(d / "test_batch")  # the test split: the file itself
    assert len(test) == 3 and test.key(0) == "test_batch#0"
    np.testing.assert_array_equal(test.load(2).image, images[11])
    both = open_source([d / "data_batch_2", d / "test_batch"])
    assert len(both) == 7 and both.load(4).key == "test_batch#0"


@pytest.mark.filterwarnings("error")
def test_cifar_pickle_from_old_numpy_and_python2(tmp_path):
    """CIFAR's own files were written by Python 2 with numpy 1: globals numpy.core.multiarray._reconstruct
    and numpy.dtype, bytes keys, str data. The same opcodes, renamed, must load (with no warning)."""
    images, labels = sample_images(3)
    raw = pickle.dumps(_cifar_batch(images, labels, False), protocol=2)
    assert b"numpy._core.multiarray" in raw or b"numpy.core.multiarray" in raw
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    (tmp_path / "data_batch_1").write_bytes(raw)
    src = open_source(tmp_path)
    np.testing.assert_array_equal(src.load(2).image, images[2])
    assert [src.load(i).label for i in range(3)] == list(labels)


def test_cifar100_folder(tmp_path):
    images, labels = sample_images(6)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    fine = (labels * 7) % 100
    _dump(_cifar_batch(images, fine, True), d / "train")
    _dump(_cifar_batch(images[:2], fine[:2], True), d / "test")
    _dump({b"fine_label_names": [f"f{i}" for i in range(100)], b"coarse_label_names": ["c"] * 20}, d / "meta")
    src = open_source(d)
    assert len(src) == 6 and len(src.classes) == 100
    assert [src.load(i).label for i in range(6)] == list(fine)
    assert src.classes[int(fine[0])] == f"f{fine[0]}"


def test_cifar_without_meta_names_classes_by_number(tmp_path):
    images, labels = sample_images(4)
    _dump(_cifar_batch(images, np.array([0, 3, 1, 3]), False), tmp_path / "data_batch_1")
    src = open_source(tmp_path)
    assert src.classes == ["0", "1", "2", "3"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + str(_Evil.marker),))


def test_restricted_unpickler_refuses_code(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    d = tmp_path / "cifar"
    d.mkdir()
    _dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Evil()}, d / "data_batch_1")
    with pytest.raises(InrUsageError, match=r"data_batch_1.*(posix|os|nt)\.system.*not allowed"):
        open_source(d)
    assert not _Evil.marker.exists()
    # builtins beyond containers are refused as well
    evil = b"\x80\x02cbuiltins\neval\nX\x06\x00\x00\x001+1000\x85R."
    (tmp_path / "e.pkl").write_bytes(evil)
    with pytest.raises(InrUsageError, match=r"builtins\.eval.*not allowed"):
        open_source(tmp_path / "e.pkl")
    assert pickle.loads(evil) == 1001  # the payload really is live code for a plain unpickler


def test_cifar_bad_content(tmp_path):
    _dump([1, 2, 3], tmp_path / "data_batch_1")
    with pytest.raises(InrUsageError, match="batch is a dict, got list"):
        open_source(tmp_path)
    _dump({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, tmp_path / "data_batch_1")
    with pytest.raises(InrUsageError, match="uint8"):
        open_source(tmp_path)
    _dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, tmp_path / "data_batch_1")
    with pytest.raises(InrUsageError, match="1 labels for 2 images"):
        open_source(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(b"\x80\x02garbage")
    with pytest.raises(InrUsageError, match="data_batch_1"):
        open_source(tmp_path / "data_batch_1")


# --------------------------------------------------------------------------------------------------
# HDF5


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NHW"])
def test_hdf5_layouts(tmp_path, layout):
    h5py = pytest.importorskip("h5py")
    images, labels = sample_images(5)
    if layout == "NHW":
        images = images[..., 0].copy()
        stored = images
    elif layout == "NCHW":
        stored = images.transpose(0, 3, 1, 2)
    else:
        stored = images
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=stored, chunks=(1,) + stored.shape[1:])
        f.create_dataset("labels", data=labels)
        f.attrs["classes"] = np.array([f"c{i}" for i in range(10)], dtype=h5py.string_dtype())
    src = open_source(path)
    assert src.kind == "hdf5" and len(src) == 5 and src.classes == [f"c{i}" for i in range(10)]
    for i in range(5):
        s = src.load(i)
        expect = images[i] if layout != "NHW" else np.repeat(images[i][..., None], 3, axis=2)
        np.testing.assert_array_equal(s.image, expect)
        assert s.label == labels[i] and s.key == f"d.h5#{i}"
    clone = pickle.loads(pickle.dumps(src))  # workers get a copy that reopens the file itself
    np.testing.assert_array_equal(clone.load(3).image, src.load(3).image)


def test_hdf5_keys(tmp_path):
    h5py = pytest.importorskip("h5py")
    images, labels = sample_images(3)
    path = tmp_path / "k.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("grp/pix", data=images)
        f.create_dataset("grp/cls", data=labels)
        f.create_dataset("other", data=np.zeros(3))
    with pytest.raises(InrUsageError, match=r"k.hdf5: no images dataset named 'imgs' \(present: grp/cls, grp/pix, other\)"):
        open_source(path, h5_images="imgs")
    with pytest.raises(InrUsageError, match=r"no images dataset \(looked for .*present: grp/cls, grp/pix, other"):
        open_source(path)
    with pytest.raises(InrUsageError, match="no labels dataset named 'lab'"):
        open_source(path, h5_images="grp/pix", h5_labels="lab")
    src = open_source(path, h5_images="grp/pix")
    assert src.classes == [] and all(src.load(i).label == -1 for i in range(3))
    src = open_source(path, h5_images="grp/pix", h5_labels="grp/cls")
    assert [src.load(i).label for i in range(3)] == list(labels)
    assert src.classes == [str(c) for c in range(labels.max() + 1)]
    with pytest.raises(InrUsageError, match="must be uint8, got dtype float64"):
        open_source(path, h5_images="other")
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_dataset("images", data=np.zeros((2, 5, 6, 7), np.uint8))
    with pytest.raises(InrUsageError, match="no channel axis of length 3"):
        open_source(tmp_path / "bad.h5")


# --------------------------------------------------------------------------------------------------
# .npy / .npz


@pytest.mark.parametrize("compressed", [False, True])
def test_npz(tmp_path, compressed):
    images, labels = sample_images(7)
    path = tmp_path / "d.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=images.transpose(0, 3, 1, 2), y=labels,
                                                      classes=np.array([f"n{i}" for i in range(10)]))
    with zipfile.ZipFile(path) as zf:
        assert (zf.getinfo("x.npy").compress_type != zipfile.ZIP_STORED) == compressed
    src = open_source(path)
    assert src.kind == "npz" and len(src) == 7 and src.classes == [f"n{i}" for i in range(10)]
    for i in [0, 1, 5, 2, 6]:  # a backward jump restarts a compressed stream
        s = src.load(i)
        np.testing.assert_array_equal(s.image, images[i])
        assert s.label == labels[i] and s.key == f"d.npz#{i}"
        assert not isinstance(s.image, np.memmap) and s.image.flags["WRITEABLE"]
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone.load(4).image, images[4])
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # load() from several threads at once
        loaded = list(pool.map(lambda i: src.load(i).image, list(range(7)) * 3))
    for k, image in enumerate(loaded):
        np.testing.assert_array_equal(image, images[k % 7])


def test_npz_damaged_member_is_a_bad_item(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)  # incompressible: data spans the member
    path = tmp_path / "dmg.npz"
    np.savez_compressed(path, images=images)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("images.npy")
    raw = bytearray(path.read_bytes())
    middle = info.header_offset + 30 + len("images.npy") + info.compress_size // 2
    raw[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    src = open_source(path)
    np.testing.assert_array_equal(src.load(0).image, images[0])
    failures = []
    for i in range(len(src)):
        try:
            src.load(i)
        except SourceItemError as e:
            failures.append(e)
    assert failures and all(e.key.startswith("dmg.npz#") and "cannot read" in e.reason for e in failures)


def test_npz_names_and_errors(tmp_path):
    images, labels = sample_images(3)
    path = tmp_path / "keras.npz"
    np.savez(path, x_train=images, y_train=labels, x_test=images[:1])
    with pytest.raises(InrUsageError, match=r"no images array \(looked for .*present: x_train, y_train, x_test"):
        open_source(path)
    src = open_source(path, h5_images="x_train", h5_labels="y_train")
    assert [src.load(i).label for i in range(3)] == list(labels)
    with pytest.raises(InrUsageError, match="no labels array named 'nope'"):
        open_source(path, h5_images="x_train", h5_labels="nope")
    np.savez(tmp_path / "obj.npz", images=np.array([object()] * 2))
    with pytest.raises(InrUsageError, match="obj.npz.*Python objects"):
        open_source(tmp_path / "obj.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InrUsageError, match="broken.npz"):
        open_source(tmp_path / "broken.npz")


def test_npy(tmp_path):
    images, _ = sample_images(4)
    np.save(tmp_path / "imgs.npy", images[..., :1])  # N,H,W,1: grayscale
    src = open_source(tmp_path / "imgs.npy")
    assert src.kind == "npy" and len(src) == 4 and src.classes == []
    s = src.load(2)
    assert s.label == -1 and s.key == "imgs.npy#2"
    np.testing.assert_array_equal(s.image, np.repeat(images[2, :, :, :1], 3, axis=2))
    np.save(tmp_path / "obj.npy", np.array([object()]))
    with pytest.raises(InrUsageError, match="obj.npy"):
        open_source(tmp_path / "obj.npy")
    np.save(tmp_path / "f.npy", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(InrUsageError, match="f.npy: images must be uint8, got dtype float32"):
        open_source(tmp_path / "f.npy")


def test_sample_is_a_namedtuple():
    s = open_source(SAMPLE).load(3)
    assert isinstance(s, Sample) and s == (s.key, s.image, s.label)


# --------------------------------------------------------------------------------------------------
# WebDataset shards and Parquet (the sources big datasets ship in)


def _encoded(array, fmt="PNG") -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]], mode="w") -> Path:
    import io
    import tarfile

    with tarfile.open(path, mode) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_shards_labels_keys_and_bad_entries(tmp_path):
    images, _ = sample_images(6)
    _tar(tmp_path / "train-000.tar", [
        ("s/000.png", _encoded(images[0])), ("s/000.cls", b"3\n"), ("s/000.txt", b"a caption"),
        ("s/001.jpg", _encoded(images[1], "JPEG")), ("s/001.json", b'{"label": 1, "w": 8}'),
        ("s/002.png", b"\x89PNG\r\n\x1a\n broken"), ("s/002.cls", b"2"),
        ("s/003.cls", b"0"),  # a sample without an image
    ])
    _tar(tmp_path / "train-001.tar.gz", [
        ("004.png", _encoded(images[4])), ("004.seg.png", _encoded(images[3])), ("004.cls", b"cat"),
        ("005.png", _encoded(images[5])),  # no label: -1
    ], mode="w:gz")
    src = open_source([tmp_path / "train-000.tar", tmp_path / "train-001.tar.gz"])
    assert src.kind == "webdataset" and len(src) == 5
    assert [src.key(i) for i in range(5)] == ["train-000.tar/s/000.png", "train-000.tar/s/001.jpg",
                                             "train-000.tar/s/002.png", "train-001.tar.gz/004.png",
                                             "train-001.tar.gz/005.png"]
    assert src.labels.tolist() == [3, 1, 2, -1, -1] and src.classes == ["0", "1", "2", "3"]
    np.testing.assert_array_equal(src.load(0).image, images[0])
    np.testing.assert_array_equal(src.load(4).image, images[5])  # from the compressed shard
    assert src.load(1).label == 1 and src.load(4).label == -1
    with pytest.raises(SourceItemError, match="train-000.tar/s/002.png: cannot decode"):
        src.load(2)
    with pytest.raises(SourceItemError, match="train-001.tar.gz/004.png: bad label in 004.cls"):
        src.load(3)
    unread = {u["key"]: u["reason"] for u in src.unread}
    assert set(unread) == {"train-000.tar/s/000.txt", "train-000.tar/s/003.cls", "train-001.tar.gz/004.seg.png"}
    assert "without an image" in unread["train-000.tar/s/003.cls"]
    clone = pickle.loads(pickle.dumps(src))  # a worker process reopens the shards itself
    np.testing.assert_array_equal(clone.load(4).image, src.load(4).image)


def test_webdataset_brace_pattern_and_folder(tmp_path):
    images, _ = sample_images(3)
    for k in range(3):
        _tar(tmp_path / f"shard-{k:04d}.tar", [(f"{k:03d}.png", _encoded(images[k])),
                                               (f"{k:03d}.cls", str(k).encode())])
    src = open_source(str(tmp_path / "shard-{0000..0002}.tar"))
    assert [src.key(i) for i in range(3)] == [f"shard-{k:04d}.tar/{k:03d}.png" for k in range(3)]
    assert src.labels.tolist() == [0, 1, 2]
    assert len(open_source(tmp_path)) == 3  # a folder of shards
    assert sources_expand("a{1..3}b{x,y}") == ["a1bx", "a1by", "a2bx", "a2by", "a3bx", "a3by"]
    assert sources_expand("p-{08..10}") == ["p-08", "p-09", "p-10"]
    with pytest.raises(InrUsageError, match="SRC not found: .*shard-0003.tar"):
        open_source(str(tmp_path / "shard-{0002..0003}.tar"))


def sources_expand(pattern):
    from inrfmt.archive_sources import expand_braces

    return expand_braces(pattern)


def _parquet(path: Path, images: list, labels: list, names=None, row_group_size=2, image_column="image"):
    pa = pytest.importorskip("pyarrow")
    import json

    import pyarrow.parquet as pq

    column = pa.array([None if b is None else {"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({image_column: column, "label": pa.array(labels, pa.int64())})
    if names is not None:  # what Hugging Face datasets stores: the features, with ClassLabel names
        features = {image_column: {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_as_hugging_face_writes_it(tmp_path):
    images, _ = sample_images(5)
    data = [_encoded(images[0]), _encoded(images[1], "JPEG"), None, b"not an image", _encoded(images[4])]
    _parquet(tmp_path / "train-00000-of-00002.parquet", data[:3], [1, 0, 1], names=["cat", "dog"])
    _parquet(tmp_path / "train-00001-of-00002.parquet", data[3:], [0, 1], names=["cat", "dog"])
    src = open_source(tmp_path)  # a folder of Parquet files
    assert src.kind == "parquet" and len(src) == 5 and src.classes == ["cat", "dog"]
    assert [src.key(i) for i in range(5)] == [f"train-0000{f}-of-00002.parquet#{r}" for f, r in
                                             [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]]
    assert src.labels.tolist() == [1, 0, 1, 0, 1]
    np.testing.assert_array_equal(src.load(0).image, images[0])
    np.testing.assert_array_equal(src.load(4).image, images[4])
    with pytest.raises(SourceItemError, match=r"#2: no image bytes .*null"):
        src.load(2)
    with pytest.raises(SourceItemError, match=r"00001-of-00002.parquet#0: cannot decode"):
        src.load(3)
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone.load(1).image, src.load(1).image)


def test_parquet_columns_and_errors(tmp_path):
    images, _ = sample_images(2)
    path = _parquet(tmp_path / "x.parquet", [_encoded(images[0]), _encoded(images[1])], [4, 2], image_column="pixels")
    with pytest.raises(InrUsageError, match="no image column .*present: pixels, label"):
        open_source(path)
    src = open_source(path, h5_images="pixels")
    assert src.classes == ["0", "1", "2", "3", "4"] and src.labels.tolist() == [4, 2]  # no names stored
    with pytest.raises(InrUsageError, match="no label column 'nope'"):
        open_source(path, h5_images="pixels", h5_labels="nope")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InrUsageError, match="bad.parquet as Parquet"):
        open_source(tmp_path / "bad.parquet")
