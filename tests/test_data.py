"""inrfmt.open / InrDataset: indexing, batched decode, torch DataLoader compatibility, stats, errors."""
import os

import numpy as np
import pytest
import torch

import inrfmt
from inrfmt import data as data_mod
from inrfmt.bank import TensorBank
from inrfmt.decode import decode_torch
from inrfmt.errors import InrFormatError, InrUsageError
from tests.inrfiles import SMALL_ARCH, random_weights, write_random_inr

MIXED = [(8, 12), (12, 8), (8, 12), (10, 10), (8, 12), (12, 8), (10, 10)]


@pytest.fixture(scope="module")
def uniform_path(tmp_path_factory):
    return write_random_inr(tmp_path_factory.mktemp("inr") / "uniform.inr", [(8, 12)] * 10, seed=1,
                            chunk_images=4)


@pytest.fixture(scope="module")
def mixed_path(tmp_path_factory):
    labels = [0, 1, 2, 0, 1, 2, 0]
    return write_random_inr(tmp_path_factory.mktemp("inr") / "mixed.inr", MIXED, labels, seed=2,
                            classes=["cat", "dog", "eel"])


def reference_bank(n, sizes, seed):
    """The same weights, straight from the writer's input (independent of the file reader and the bank loader)."""
    return TensorBank.from_weight_batch(random_weights(SMALL_ARCH, n, seed), SMALL_ARCH,
                                        heights=[h for h, _ in sizes], widths=[w for _, w in sizes])


def test_open_exposes_file_bank_labels_classes_and_sizes(mixed_path):
    with inrfmt.open(mixed_path, device="cpu") as ds:
        assert isinstance(ds, inrfmt.InrDataset) and isinstance(ds, torch.utils.data.Dataset)
        assert len(ds) == len(MIXED) and ds.file.num_images == len(MIXED)
        assert ds.bank.num_images == len(MIXED) and ds.device == torch.device("cpu")
        assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
        assert ds.classes == ["cat", "dog", "eel"]
        assert [tuple(s) for s in ds.sizes.tolist()] == MIXED and ds.native_size is None
        assert ds.arch == SMALL_ARCH


def test_default_device_is_cpu_without_cuda(uniform_path):
    with inrfmt.open(uniform_path) as ds:
        assert ds.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_getitem_is_the_native_size_decode_with_an_int_label(mixed_path):
    ref = reference_bank(len(MIXED), MIXED, seed=2)
    with inrfmt.open(mixed_path, device="cpu") as ds:
        for i, (h, w) in enumerate(MIXED):
            image, label = ds[i]
            assert image.shape == (3, h, w) and image.dtype == torch.float32
            assert type(label) is int and label == [0, 1, 2, 0, 1, 2, 0][i]
            torch.testing.assert_close(image, decode_torch(ref, [i], (h, w))[0], atol=1e-6, rtol=0)
            assert 0.0 <= image.min() and image.max() <= 1.0
        last, _ = ds[-1]
        assert torch.equal(last, ds[len(MIXED) - 1][0])
        with pytest.raises(IndexError):
            ds[len(MIXED)]
        with pytest.raises(InrUsageError):
            ds["0"]


def test_decode_is_one_batched_call_and_checks_sizes(mixed_path, monkeypatch):
    calls = []
    real = data_mod.decode_batch

    def counting(bank, indices, size, theta=None, **kw):
        calls.append((len(indices), tuple(size) if not isinstance(size, int) else size))
        return real(bank, indices, size, theta, **kw)

    monkeypatch.setattr(data_mod, "decode_batch", counting)
    with inrfmt.open(mixed_path, device="cpu") as ds:
        got = ds.decode([0, 2, 4])  # all 8x12: native size allowed
        assert got.shape == (3, 3, 8, 12) and calls == [(3, (8, 12))]
        assert ds.decode(torch.tensor([1, 5])).shape == (2, 3, 12, 8)
        with pytest.raises(InrUsageError, match="different native sizes.*pass size="):
            ds.decode([0, 1])
        calls.clear()
        out = ds.decode([0, 1, 3], size=(16, 20), dtype=torch.float16)
        assert out.shape == (3, 3, 16, 20) and out.dtype == torch.float16 and calls == [(3, (16, 20))]
        with pytest.raises(InrUsageError, match="out of range"):
            ds.decode([0, 99])


def test_getitems_decodes_once_per_native_size_and_keeps_order(mixed_path, monkeypatch):
    calls = []
    real = data_mod.decode_batch
    monkeypatch.setattr(data_mod, "decode_batch",
                        lambda bank, idx, size, theta=None, **kw: calls.append(size) or real(bank, idx, size, theta, **kw))
    with inrfmt.open(mixed_path, device="cpu") as ds:
        order = [6, 1, 0, 3, 5, 2]
        items = ds.__getitems__(order)
        assert len(calls) == 3  # 8x12, 12x8, 10x10
        for i, (image, label) in zip(order, items):
            assert image.shape == (3, *MIXED[i]) and label == int(ds.labels[i])
            torch.testing.assert_close(image, ds[i][0], atol=0, rtol=0)


def test_plain_torch_dataloader_works_with_one_decode_per_batch(uniform_path, monkeypatch):
    calls = []
    real = data_mod.decode_batch
    monkeypatch.setattr(data_mod, "decode_batch",
                        lambda bank, idx, size, theta=None, **kw: calls.append(len(idx)) or real(bank, idx, size, theta, **kw))
    with inrfmt.open(uniform_path, device="cpu") as ds:
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)
        batches = list(loader)
        assert calls == [4, 4, 2]  # one decode call per batch
        seen = []
        for images, labels in batches:
            assert images.shape == (len(labels), 3, 8, 12) and labels.dtype == torch.int64
            torch.testing.assert_close(images, ds.decode(labels), atol=0, rtol=0)  # label = image index
            seen += labels.tolist()
        assert sorted(seen) == list(range(10)) and seen != list(range(10))


def test_stats_reports_bytes_and_load_time(uniform_path):
    with inrfmt.open(uniform_path, device="cpu") as ds:
        stats = ds.stats()
        assert stats["file_bytes"] == os.path.getsize(uniform_path)
        assert stats["bank_bytes"] == ds.bank.nbytes > 0
        assert stats["file_bytes_per_image"] == pytest.approx(stats["file_bytes"] / 10)
        assert stats["bank_bytes_per_image"] == pytest.approx(stats["bank_bytes"] / 10)
        assert stats["load_seconds"] > 0 and stats["open_seconds"] >= stats["load_seconds"]
        assert stats["device"] == "cpu" and stats["num_images"] == 10


def test_close_and_errors(uniform_path, tmp_path):
    ds = inrfmt.open(uniform_path, device="cpu")
    ds.close()
    with pytest.raises(InrUsageError, match="closed"):
        ds.decode([0])
    ds.close()  # idempotent
    with pytest.raises(InrUsageError, match="no such file"):
        inrfmt.open(tmp_path / "missing.inr")
    broken = tmp_path / "broken.inr"
    broken.write_bytes(b"not an inr file at all" * 10)
    with pytest.raises(InrFormatError):
        inrfmt.open(broken, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InrUsageError, match="CUDA is not available"):
            inrfmt.open(uniform_path, device="cuda")


def test_empty_index_lists(uniform_path):
    with inrfmt.open(uniform_path, device="cpu") as ds:
        assert ds.__getitems__([]) == []
        assert ds.decode([], size=4).shape == (0, 3, 4, 4)
        assert np.array_equal(ds.sizes, np.tile([8, 12], (10, 1)))


def test_bank_layouts_decode_and_load_the_same(tmp_path):
    # A pruned file held dense and compact: identical pixels from decode, __getitem__ and the loader.
    from tests.test_bank import write_inr
    from inrfmt.spec import Architecture

    path = tmp_path / "pruned.inr"
    write_inr(path, Architecture(sine_layers=6, width=24), 13, prune=0.4, chunk_images=5)
    with inrfmt.open(path, device="cpu", bank_layout="dense") as dense, \
            inrfmt.open(path, device="cpu", bank_layout="compact") as compact:
        assert dense.stats()["bank_layout"] == "dense" and compact.stats()["bank_layout"] == "compact"
        assert compact.stats()["bank_bytes"] < dense.stats()["bank_bytes"]
        torch.testing.assert_close(compact.decode(range(13), size=9), dense.decode(range(13), size=9),
                                   atol=0, rtol=0)
        torch.testing.assert_close(compact[12][0], dense[12][0], atol=0, rtol=0)
        for (a, la), (b, lb) in zip(compact.loader(4, size=7, seed=3), dense.loader(4, size=7, seed=3)):
            assert torch.equal(la, lb) and torch.equal(a, b)
    with inrfmt.open(path, device="cpu") as auto:  # 40% pruned: a dense bank would exceed 1.1x the file
        assert auto.bank.layout == "compact"
    with pytest.raises(InrUsageError, match="bank layout"):
        inrfmt.open(path, device="cpu", bank_layout="sparse")


# ------------------------------------------------------------------------ what a torch user expects of it
def _first_batch(loader):
    return next(iter(loader))


@pytest.mark.slow
@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_dataloader_with_spawn_and_forkserver_workers(uniform_path, context):
    # Workers started with spawn/forkserver get a pickled dataset: it reopens its file and rebuilds its bank.
    with inrfmt.open(uniform_path, device="cpu") as ds:
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=context)
        batches = list(loader)
        assert [len(labels) for _, labels in batches] == [4, 4, 2]
        for images, labels in batches:
            torch.testing.assert_close(images, ds.decode(labels), atol=0, rtol=0)


def test_pickle_and_deepcopy_reopen_the_file_and_rebuild_the_bank_lazily(mixed_path):
    import copy
    import pickle

    with inrfmt.open(mixed_path, device="cpu", size=(6, 6)) as ds:
        for clone in (pickle.loads(pickle.dumps(ds)), copy.deepcopy(ds)):
            assert clone._bank is None  # nothing uploaded until the first decode
            assert clone.file is not ds.file and clone.size == (6, 6) and len(clone) == len(ds)
            torch.testing.assert_close(clone[3][0], ds[3][0], atol=0, rtol=0)
            assert clone._bank is not None and clone.labels.tolist() == ds.labels.tolist()
            clone.close()
        ds.close()
        with pytest.raises(InrUsageError, match="closed"):
            pickle.dumps(ds)


def test_torchvision_attributes(mixed_path):
    with inrfmt.open(mixed_path, device="cpu") as ds:
        assert ds.targets == [0, 1, 2, 0, 1, 2, 0] and all(type(t) is int for t in ds.targets)
        assert ds.classes == ["cat", "dog", "eel"] and ds.class_to_idx == {"cat": 0, "dog": 1, "eel": 2}


def test_size_and_transform_make_mixed_sizes_batch_like_torchvision(mixed_path):
    # Without size= a DataLoader over a mixed-size file cannot stack its images; with it, it can.
    with inrfmt.open(mixed_path, device="cpu") as ds:
        with pytest.raises(RuntimeError, match="stack"):
            list(torch.utils.data.DataLoader(ds, batch_size=4))
    calls = []
    with inrfmt.open(mixed_path, device="cpu", size=(6, 7), transform=lambda x: calls.append(1) or x * 2,
                     target_transform=lambda y: y + 10) as ds:
        images, labels = _first_batch(torch.utils.data.DataLoader(ds, batch_size=4))
        assert images.shape == (4, 3, 6, 7) and labels.tolist() == [10, 11, 12, 10] and len(calls) == 4
        torch.testing.assert_close(images, 2 * ds.decode([0, 1, 2, 3], size=(6, 7)), atol=0, rtol=0)
        image, label = ds[1]
        assert image.shape == (3, 6, 7) and label == 11
    with pytest.raises(InrUsageError, match="transform must be callable"):
        inrfmt.open(mixed_path, device="cpu", transform="resize")


def test_any_integer_index_and_slices(mixed_path):
    with inrfmt.open(mixed_path, device="cpu") as ds:
        want = ds[2][0]
        for index in (2, np.int32(2), np.uint8(2), np.array(2), torch.tensor(2), torch.tensor([2], dtype=torch.int16),
                      -5, np.int64(-5)):
            torch.testing.assert_close(ds[index][0], want, atol=0, rtol=0)
        part = ds[1:6:2]
        assert [label for _, label in part] == [1, 0, 2] and [tuple(x.shape[1:]) for x, _ in part] == [
            MIXED[1], MIXED[3], MIXED[5]]
        assert ds[5:2] == []
        for bad in (2.0, "2", True, torch.tensor(2.0), None):
            with pytest.raises(InrUsageError, match="index must be an integer"):
                ds[bad]
        with pytest.raises(IndexError):
            ds[7]


def test_getitem_and_getitems_hand_the_decoder_device_indices(mixed_path, monkeypatch):
    # ds[i] and __getitems__ give the decoder an index tensor (on CUDA: a view of a device arange or a
    # non-blocking copy from pinned memory), never a Python list for it to upload.
    seen = []
    real = data_mod.decode_batch
    monkeypatch.setattr(data_mod, "decode_batch",
                        lambda bank, idx, size, *a, **kw: seen.append(idx) or real(bank, idx, size, *a, **kw))
    with inrfmt.open(mixed_path, device="cpu", size=5) as ds:
        ds[3]
        ds.__getitems__([6, 0, 2])
    assert all(isinstance(idx, torch.Tensor) and idx.device == torch.device("cpu") for idx in seen)
    assert [idx.tolist() for idx in seen] == [[3], [6, 0, 2]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_getitem_and_getitems_do_not_synchronize(uniform_path):
    with inrfmt.open(uniform_path, device="cuda") as ds:
        ds[0], ds.__getitems__([3, 1])  # warm-up: kernels compiled, buffers made
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                image, _ = ds[4]
                items = ds.__getitems__([5, 6, 7])  # contiguous: a view of the device arange
                items += ds.__getitems__([9, 2, 0])  # through pinned staging
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(torch.stack([x for x, _ in items]).cpu(),
                                   ds.decode(torch.tensor([5, 6, 7, 9, 2, 0])).cpu(), atol=0, rtol=0)
