"""inrfmt.export: decoded images -> ImageFolder tree (PNG/JPEG) or HDF5, checked against the reference decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inrfmt.bank import TensorBank
from inrfmt.decode import decode_torch
from inrfmt.errors import InrUsageError
from inrfmt.export import export, file_names, folder_names
from inrfmt.sources import open_source
from tests.badfiles import running_as_root
from tests.inrfiles import write_random_inr

SIZES = [(8, 8), (6, 10), (8, 8), (6, 10), (8, 8)]
LABELS = [0, 2, 1, 0, 2]
CLASSES = ("cat", "dog", "../evil")


@pytest.fixture(scope="module")
def inr_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("inr") / "small.inr"
    return write_random_inr(path, SIZES, LABELS, classes=CLASSES, chunk_images=2)


def reference_uint8(path: str, i: int, hw) -> np.ndarray:
    bank = TensorBank.from_file(path, "cpu")
    pixels = decode_torch(bank, [i], hw)[0]
    return (pixels * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_png_tree_structure_names_sizes_and_pixels(inr_path, tmp_path):
    out = tmp_path / "tree"
    summary = export(inr_path, out, format="png", device="cpu", batch_size=2)
    assert summary["images"] == 5 and summary["format"] == "png" and summary["sizes"] == [[6, 10], [8, 8]]
    assert files_under(out) == [
        "___evil/00001.png", "___evil/00004.png", "cat/00000.png", "cat/00003.png", "dog/00002.png",
    ]
    for name, i in [("cat/00000.png", 0), ("___evil/00001.png", 1), ("___evil/00004.png", 4)]:
        with Image.open(out / name) as img:
            assert img.mode == "RGB" and (img.height, img.width) == SIZES[i]
            np.testing.assert_array_equal(np.asarray(img), reference_uint8(inr_path, i, SIZES[i]))
    # the tree reads back as a source with the (safe) class names and the right labels
    src = open_source(out)
    assert src.classes == ["___evil", "cat", "dog"]
    assert [(src.key(i), src.load(i).label) for i in range(len(src))][0] == ("___evil/00001.png", 0)
    assert not list(out.rglob("*.tmp"))


def test_size_limit_and_jpeg(inr_path, tmp_path):
    out = tmp_path / "jpeg"
    summary = export(inr_path, out, format="jpeg", size=(5, 7), limit=3, device="cpu")
    assert summary["images"] == 3 and summary["sizes"] == [[5, 7]]
    assert files_under(out) == ["___evil/00001.jpg", "cat/00000.jpg", "dog/00002.jpg"]
    with Image.open(out / "dog/00002.jpg") as img:
        assert img.format == "JPEG" and img.size == (7, 5)
        err = np.abs(np.asarray(img, np.int16) - reference_uint8(inr_path, 2, (5, 7))).mean()
    assert err < 20  # lossy, but the same picture
    # An int is torchvision's Resize(int): the shorter side, aspect ratio kept (6x10 -> 3x5, not 3x3).
    summary = export(inr_path, tmp_path / "short", size=3, limit=2, device="cpu")
    assert summary["sizes"] == [[3, 3], [3, 5]]
    with Image.open(tmp_path / "short" / "___evil" / "00001.png") as img:
        assert (img.height, img.width) == (3, 5)
        np.testing.assert_array_equal(np.asarray(img), reference_uint8(inr_path, 1, (3, 5)))


def test_h5_export_round_trips_through_sources(inr_path, tmp_path):
    pytest.importorskip("h5py")
    with pytest.raises(InrUsageError, match="2 different sizes.*pass size"):
        export(inr_path, tmp_path / "x.h5", format="h5", device="cpu")
    assert not (tmp_path / "x.h5").exists()
    summary = export(inr_path, tmp_path / "x.h5", format="h5", size=(6, 10), device="cpu", batch_size=3)
    assert summary["output"] == str(tmp_path / "x.h5")
    src = open_source(tmp_path / "x.h5")
    assert src.classes == list(CLASSES) and len(src) == 5
    for i in range(5):
        s = src.load(i)
        assert s.label == LABELS[i]
        np.testing.assert_array_equal(s.image, reference_uint8(inr_path, i, (6, 10)))
    # OUT is the file to write, whatever its name; an existing folder is refused
    export(inr_path, tmp_path / "plain", format="h5", size=(3, 3), device="cpu")
    assert (tmp_path / "plain").is_file()
    with pytest.raises(InrUsageError, match="plain exists"):
        export(inr_path, tmp_path / "plain", format="h5", size=(3, 3), device="cpu")
    export(inr_path, tmp_path / "plain", format="h5", size=(3, 3), device="cpu", overwrite=True)
    (tmp_path / "folder").mkdir()
    with pytest.raises(InrUsageError, match="folder is a folder"):
        export(inr_path, tmp_path / "folder", format="h5", size=(3, 3), device="cpu")


def test_existing_outdir_and_bad_arguments(inr_path, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InrUsageError, match="busy exists and is not empty"):
        export(inr_path, out, device="cpu")
    assert files_under(out) == ["keep.txt"]
    export(inr_path, out, device="cpu", limit=1, overwrite=True)
    assert files_under(out) == ["cat/00000.png", "keep.txt"]
    (tmp_path / "empty").mkdir()
    export(inr_path, tmp_path / "empty", device="cpu", limit=1)  # an empty folder is fine
    with pytest.raises(InrUsageError, match="format must be one of png, jpeg, h5, got 'gif'"):
        export(inr_path, tmp_path / "a", format="gif")
    with pytest.raises(InrUsageError, match="batch_size"):
        export(inr_path, tmp_path / "a", batch_size=0)
    with pytest.raises(InrUsageError, match="size"):
        export(inr_path, tmp_path / "a", size=(0, 3))
    with pytest.raises(InrUsageError, match="limit"):
        export(inr_path, tmp_path / "a", limit=-1)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InrUsageError, match="afile exists and is not a folder"):
        export(inr_path, tmp_path / "afile", device="cpu")


def test_unlabelled_images_export_flat(tmp_path):
    path = write_random_inr(tmp_path / "u.inr", [(4, 4)] * 3, [-1, -1, -1])
    export(path, tmp_path / "out", device="cpu")
    assert files_under(tmp_path / "out") == ["00000.png", "00001.png", "00002.png"]
    assert open_source(tmp_path / "out").classes == []  # reads back as the flat folder it came from
    # labels without stored names use the decimal label
    path = write_random_inr(tmp_path / "n.inr", [(4, 4)] * 2, [3, -1])
    export(path, tmp_path / "out2", device="cpu")
    assert files_under(tmp_path / "out2") == ["00001.png", "3/00000.png"]


def test_files_are_named_by_their_source_keys(tmp_path):
    keys = ["cat/x.jpg", "dog/sub/y.PNG", "cat/x.png", "train.tar/000042.jpg", "data.h5#7", "", "cat/../../up.jpg"]
    labels = [0, 1, 0, 0, 1, 1, 0]
    path = write_random_inr(tmp_path / "k.inr", [(4, 5)] * 7, labels, classes=("cat", "dog"), keys=keys)
    export(path, tmp_path / "out", device="cpu")
    assert files_under(tmp_path / "out") == [
        "cat/__/__/up.png", "cat/train.tar/000042.png", "cat/x.png", "cat/x_2.png", "dog/00005.png",
        "dog/data.h5#7.png", "dog/sub/y.png"]
    src = open_source(tmp_path / "out")
    assert src.classes == ["cat", "dog"] and len(src) == 7
    assert file_names(["a/b.jpg"], np.array([-1]), [], "png", 5) == ["a/b.png"]  # unlabelled: the whole key


def test_unwritable_output_is_a_one_line_usage_error(inr_path, tmp_path):
    if not running_as_root():
        locked = tmp_path / "ro"
        locked.mkdir()
        locked.chmod(0o555)
        with pytest.raises(InrUsageError, match="ro is not writable"):
            export(inr_path, locked / "exp", device="cpu")
        locked.chmod(0o755)
    if Path("/proc/self").is_dir():  # a folder nobody can create files in, even root
        with pytest.raises(InrUsageError, match="cannot write /proc/inrfmt-export"):
            export(inr_path, "/proc/inrfmt-export", device="cpu")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InrUsageError, match="file is not a folder"):
        export(inr_path, tmp_path / "file" / "sub", device="cpu")


def test_folder_names_are_safe_and_unique():
    names = folder_names(["a/b", "a\\b", "..", ".hidden", "", "unlabelled", "ok"], np.arange(-1, 7))
    assert names[0] == "a_b" and names[1] == "a_b_1" and names[2] == "__" and names[3] == "_hidden"
    assert names[4] == "_" and names[5] == "unlabelled" and names[6] == "ok" and -1 not in names
    assert all("/" not in v and not v.startswith(".") for v in names.values())
