"""TensorBank: upload of a real .inr file, chunk by chunk, and its size against the file's."""
import contextlib
import os

import numpy as np
import pytest
import torch

from inrfmt import siren
from inrfmt.bank import TORCH_DTYPES, TensorBank, layout_bytes
from inrfmt.decode import decode
from inrfmt.errors import InrFormatError, InrUsageError
from inrfmt.reader import InrFile
from inrfmt.spec import Architecture, WeightBatch
from inrfmt.writer import InrWriter

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_weights(arch, n, *, hidden_dtype="int8", prune=0.0, seed=0):
    """WeightBatch of n images: SIREN-initialised floats, hidden layers quantized/pruned like the encoder's."""
    rng = np.random.default_rng(seed)
    p = siren.init_params(arch, n, generator=torch.Generator().manual_seed(seed))
    hidden = p.hidden_w.numpy()
    mask = rng.random(hidden.shape) >= prune if prune else None
    if mask is not None:
        hidden = hidden * mask
    h = arch.hidden_layers
    if hidden_dtype == "int8":
        scale = np.abs(hidden).max(axis=(-2, -1)) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.round(hidden / scale[:, :, None, None]), -127, 127).astype(np.int8)
    else:
        scale = np.ones((n, h), np.float32)
        q = hidden.astype(hidden_dtype)
    return WeightBatch(first_w=p.first_w.numpy(), first_b=p.first_b.numpy(), hidden_w=q, hidden_scale=scale,
                       hidden_b=p.hidden_b.numpy(), last_w=p.last_w.numpy(), last_b=p.last_b.numpy(), mask=mask)


def write_inr(path, arch, n, *, hidden_dtype="int8", prune=0.0, chunk_images=1024, seed=0, float_dtype="float32"):
    wb = random_weights(arch, n, hidden_dtype=hidden_dtype, prune=prune, seed=seed)
    total = arch.hidden_layers * arch.width ** 2
    ratio = 1 - wb.mask.reshape(n, -1).sum(1) / total if wb.mask is not None else np.zeros(n)
    rng = np.random.default_rng(seed + 1)
    with InrWriter(path, arch, hidden_dtype=hidden_dtype, has_masks=wb.mask is not None, float_dtype=float_dtype,
                   classes=["a", "b", "c"], chunk_images=chunk_images) as w:
        w.add(wb, labels=rng.integers(0, 3, n), heights=rng.integers(8, 40, n), widths=rng.integers(8, 40, n),
              psnr=np.full(n, 30.0), prune_ratio=ratio)
    return wb


@pytest.mark.parametrize("hidden_dtype,prune", [("int8", 0.25), ("float16", 0.0), ("float32", 0.1)])
def test_from_file_equals_chunk_data(tmp_path, hidden_dtype, prune):
    arch = Architecture(sine_layers=3, width=12)
    path = tmp_path / "d.inr"
    write_inr(path, arch, 11, hidden_dtype=hidden_dtype, prune=prune, chunk_images=4)
    with InrFile(path) as f:
        assert f.num_chunks == 3
        calls = []
        bank = TensorBank.from_file(f, "cpu", progress=lambda done, total: calls.append((done, total)))
        assert calls == [(4, 11), (8, 11), (11, 11)]
        assert bank.num_images == 11 and bank.device.type == "cpu"
        assert bank.hidden_w.dtype == {"int8": torch.int8, "float16": torch.float16,
                                       "float32": torch.float32}[hidden_dtype]
        for k in range(f.num_chunks):
            start, stop = f.chunk_range(k)
            chunk = f.read_chunk(k)
            for name in ("first_w", "first_b", "hidden_w", "hidden_scale", "hidden_b", "last_w", "last_b"):
                t = getattr(bank, name)
                assert t.is_contiguous()
                np.testing.assert_array_equal(t[start:stop].numpy(), getattr(chunk, name), err_msg=name)
        np.testing.assert_array_equal(bank.labels.numpy(), f.index["label"])
        np.testing.assert_array_equal(bank.heights.numpy(), f.index["height"])
        np.testing.assert_array_equal(bank.widths.numpy(), f.index["width"])
        assert bank.labels.dtype == torch.int64 and bank.heights.dtype == torch.int32
    assert bank.load_seconds > 0
    assert bank.nbytes == sum(t.numel() * t.element_size() for t in (
        bank.first_w, bank.first_b, bank.hidden_w, bank.hidden_scale, bank.hidden_b, bank.last_w, bank.last_b,
        bank.labels, bank.heights, bank.widths))


def test_from_path_and_decode_matches_file_weights(tmp_path):
    arch = Architecture(sine_layers=2, width=9)
    path = tmp_path / "d.inr"
    wb = write_inr(path, arch, 5, prune=0.3)
    bank = TensorBank.from_file(os.fspath(path), device="cpu")
    # The same weights built straight from the writer's input decode to the same pixels.
    direct = TensorBank.from_weight_batch(wb, arch)
    torch.testing.assert_close(decode(bank, [0, 4], 8), decode(direct, [0, 4], 8), atol=0, rtol=0)


@pytest.mark.parametrize("hidden_dtype,prune,float_dtype", [("int8", 0.3, "float32"), ("int8", 0.0, "float32"),
                                                            ("float16", 0.2, "float16"), ("float32", 0.1, "float16")])
def test_device_side_mask_expansion_equals_reader(tmp_path, hidden_dtype, prune, float_dtype):
    # The CUDA load path (raw payload -> device -> bitmap expanded there), run on CPU tensors. Width 13 with
    # 2 hidden layers: 338 mask bits, so padding bits in the last byte and odd-length bitmaps (realignment).
    arch = Architecture(sine_layers=3, width=13)
    path = tmp_path / "d.inr"
    write_inr(path, arch, 9, hidden_dtype=hidden_dtype, prune=prune, chunk_images=4, float_dtype=float_dtype)
    with InrFile(path) as f:
        reference = f.read_images(np.arange(9))  # the reader's own (host) bitmap expansion
        bank = TensorBank.from_file(f, "cpu", layout="dense", workers=2)
        index = f.index
    for name in ("first_w", "first_b", "hidden_w", "hidden_scale", "hidden_b", "last_w", "last_b"):
        np.testing.assert_array_equal(getattr(bank, name).float().numpy(), getattr(reference, name), err_msg=name)
    assert bank.hidden_w.dtype == TORCH_DTYPES[hidden_dtype]
    for name, field in (("labels", "label"), ("heights", "height"), ("widths", "width")):
        assert getattr(bank, name).tolist() == index[field].tolist(), name


def test_bank_load_rejects_a_payload_that_disagrees_with_the_index(tmp_path):
    arch = Architecture(sine_layers=2, width=8)
    path = tmp_path / "d.inr"
    write_inr(path, arch, 5, prune=0.3)
    with InrFile(path) as f:
        original = f.index
        index = original.copy()
        index["nnz"][2] += 1  # a tampered index: chunk payload length no longer matches
        f.index = index
        with pytest.raises(InrFormatError, match="does not match its layout"):
            TensorBank.from_file(f, "cpu")
        index["nnz"][3] -= 1  # same total, but two masks disagree with their counts
        for layout in ("dense", "compact"):
            with pytest.raises(InrFormatError, match=r"index\[2\]\.nnz"):
                TensorBank.from_file(f, "cpu", layout=layout)
        f.index = original


@pytest.mark.parametrize("extra", [b"\x00junk", "second frame"])
@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_bank_loads_exactly_what_verify_accepts(tmp_path, monkeypatch, extra, layout):
    # A chunk frame followed by more bytes (junk, or a whole second zstd frame) breaks the frame rules of
    # FORMAT.md; the file's tables are consistent with it (the writer itself appended them), so only the
    # chunk read can tell. verify() and every bank load go through the same check and must both refuse.
    import zstandard

    import inrfmt
    from inrfmt import writer as writer_module

    real = zstandard.ZstdCompressor

    class Padded:
        def __init__(self, level, **kw):
            self.inner = real(level=level, **kw)

        def compress(self, raw):
            frame = self.inner.compress(raw)
            return frame + (self.inner.compress(b"x" * 10) if extra == "second frame" else extra)

    monkeypatch.setattr(writer_module.zstandard, "ZstdCompressor", Padded)
    arch = Architecture(sine_layers=3, width=8)
    path = tmp_path / "extra.inr"
    write_inr(path, arch, 5, prune=0.3, chunk_images=2)
    monkeypatch.undo()
    with InrFile(path) as f:  # the structure is fine: frames are only decoded when read
        with pytest.raises(InrFormatError, match=r"chunks\[0\]"):
            f.verify()
        with pytest.raises(InrFormatError, match=r"chunks\[0\]"):
            TensorBank.from_file(f, "cpu", layout=layout)
    with pytest.raises(InrFormatError, match=r"chunks\[0\]"):
        inrfmt.open(path, device="cpu", bank_layout=layout)


@pytest.mark.parametrize("sine_layers,width,prune,layout", [
    (10, 28, 0.0, "dense"), (10, 28, 0.156, "dense"),   # the paper's CIFAR-10 mean prune ratio
    (10, 32, 0.242, "compact"), (10, 40, 0.255, "compact"),  # Flowers-102, Mini-ImageNet
    (10, 40, 0.4, "compact"), (3, 15, 0.156, "dense")])
def test_bank_bytes_per_image_within_1_1_of_file_bytes(tmp_path, sine_layers, width, prune, layout):
    # A dense int8 bank outgrows the (sparse, compressed) file as pruning grows: bank/file = 1.01 unpruned,
    # 1.08 at 15.6%, 1.15 at 25%, 1.33 at 40% (10x40). layout="auto" switches to the compact layout there.
    arch = Architecture(sine_layers=sine_layers, width=width)
    path = tmp_path / "d.inr"
    n = 300
    write_inr(path, arch, n, prune=prune)
    with InrFile(path) as f:
        file_bytes = f.file_bytes
        bank = TensorBank.from_file(f, "cpu")
        sizes = layout_bytes(f)
    assert bank.layout == layout
    assert bank.nbytes == sizes[layout]
    ratio = (bank.nbytes / n) / (file_bytes / n)
    assert ratio <= 1.1, f"bank {bank.nbytes / n:.0f} B/image vs file {file_bytes / n:.0f} B/image"
    # Exactly the contract's tensors: int8 hidden weights (dense, or kept values + bitmaps + offsets), no
    # dequantized float copy.
    w, h = width, sine_layers - 1
    floats = 2 * w + w + h + h * w + 3 * w + 3
    hidden = h * w * w if layout == "dense" else \
        (bank.hidden_values.numel() / n + (h * w * w + 7) // 8 + 8)
    assert bank.nbytes == pytest.approx(n * (hidden + 4 * floats + 8 + 4 + 4), abs=0.5)


@pytest.mark.parametrize("hidden_dtype,prune,float_dtype,width", [
    ("int8", 0.3, "float32", 13), ("int8", 0.0, "float32", 12), ("float16", 0.2, "float16", 13),
    ("float32", 0.1, "float32", 9), ("int8", 1.0, "float32", 8)])
def test_compact_bank_equals_dense_bank(tmp_path, hidden_dtype, prune, float_dtype, width):
    # Width 13 with 2 hidden layers: 338 mask bits per image, so padding bits and odd-length bitmaps.
    arch = Architecture(sine_layers=3, width=width)
    path = tmp_path / "d.inr"
    write_inr(path, arch, 11, hidden_dtype=hidden_dtype, prune=prune, chunk_images=4, float_dtype=float_dtype)
    with InrFile(path) as f:
        dense = TensorBank.from_file(f, "cpu", layout="dense")
        calls = []
        compact = TensorBank.from_file(f, "cpu", layout="compact", workers=2,
                                       progress=lambda done, total: calls.append(done))
        nnz = np.asarray(f.index["nnz"], np.int64)
    assert calls == [4, 8, 11]
    assert compact.layout == "compact" and compact.hidden_w is None and dense.layout == "dense"
    assert compact.hidden_values.numel() == nnz.sum()
    assert compact.hidden_offsets.tolist() == (np.cumsum(nnz) - nnz).tolist()
    assert compact.hidden_dtype == hidden_dtype
    for name in ("first_w", "first_b", "hidden_scale", "hidden_b", "last_w", "last_b", "labels", "heights",
                 "widths"):
        assert torch.equal(getattr(compact, name), getattr(dense, name)), name
    idx = torch.tensor([10, 0, 3, 3, 7])
    assert torch.equal(compact.hidden_dense(idx), dense.hidden_w[idx])
    torch.testing.assert_close(decode(compact, idx, (5, 9)), decode(dense, idx, (5, 9)), atol=0, rtol=0)
    # Conversions both ways give the same tensors (dense -> compact drops zeros, which decode the same).
    assert torch.equal(compact.to_layout("dense").hidden_w, dense.hidden_w)
    again = dense.to_layout("compact")
    assert torch.equal(again.hidden_dense(idx), dense.hidden_w[idx])
    assert compact.to("cpu").layout == "compact" and compact.to_layout("compact") is compact
    assert "compact" in repr(compact)


@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_float16_file_keeps_float16_in_the_bank(tmp_path, layout):
    # --float-dtype float16 files: first/last layers and biases stay float16 on the device (exact: the file
    # holds float16), so the bank stays about the file's size; the decoders upcast them.
    arch = Architecture(sine_layers=3, width=16)
    path = tmp_path / "d.inr"
    wb = write_inr(path, arch, 40, prune=0.1, chunk_images=16, float_dtype="float16")
    with InrFile(path) as f:
        bank = TensorBank.from_file(f, "cpu", layout=layout)
        assert bank.nbytes == layout_bytes(f)[layout]
        assert bank.nbytes <= 1.1 * f.file_bytes
        chunk = f.read_chunk(1)
    assert bank.float_dtype == "float16"
    for name in ("first_w", "first_b", "hidden_b", "last_w", "last_b"):
        assert getattr(bank, name).dtype == torch.float16, name
        np.testing.assert_array_equal(getattr(bank, name)[16:32].float().numpy(), getattr(chunk, name))
    # The same weights upcast to float32 decode to the same pixels.
    upcast = TensorBank.from_weight_batch(chunk, arch)
    idx = torch.arange(16, 32)
    torch.testing.assert_close(decode(bank, idx, 7), decode(upcast, idx - 16, 7), atol=0, rtol=0)
    assert bank.to("cpu").float_dtype == "float16"
    with pytest.raises(InrUsageError, match="last_b has dtype"):
        TensorBank(arch, **{**{n: getattr(bank, n) for n in bank._fields()}, "last_b": bank.last_b.float()})


def test_compact_bank_validation(tmp_path):
    arch = Architecture(sine_layers=3, width=6)
    p = siren.init_params(arch, 4, generator=torch.Generator().manual_seed(0))
    dense = TensorBank.from_params(p._replace(hidden_w=p.hidden_w * (p.hidden_w > 0)), arch)
    good = dense.to_layout("compact")
    parts = {name: getattr(good, name) for name in good._fields()}
    TensorBank(arch, **parts)
    with pytest.raises(InrUsageError, match="disagree"):
        TensorBank(arch, **{**parts, "hidden_offsets": parts["hidden_offsets"].flip(0).contiguous()})
    with pytest.raises(InrUsageError, match="disagree"):
        TensorBank(arch, **{**parts, "hidden_values": parts["hidden_values"][:-1].contiguous()})
    flipped = parts["hidden_masks"].clone()
    flipped[0, 0] ^= 0x80  # one weight of image 0 kept <-> pruned: the counts no longer match the offsets
    with pytest.raises(InrUsageError, match="disagree"):
        TensorBank(arch, **{**parts, "hidden_masks": flipped})
    with pytest.raises(InrUsageError, match="not both"):
        TensorBank(arch, hidden_w=dense.hidden_w, **parts)
    with pytest.raises(InrUsageError, match="give hidden_w"):
        TensorBank(arch, **{k: v for k, v in parts.items() if k != "hidden_masks"})
    with pytest.raises(InrUsageError, match="hidden_masks has dtype"):
        TensorBank(arch, **{**parts, "hidden_masks": parts["hidden_masks"].to(torch.int8)})
    with pytest.raises(InrUsageError, match="bank layout"):
        good.to_layout("sparse")
    with pytest.raises(InrUsageError, match="bank layout"):
        TensorBank.from_file(tmp_path / "unused.inr", "cpu", layout="sparse")
    # A set padding bit (width 5: 50 bits per image, 6 bits of padding) is refused too.
    arch5 = Architecture(sine_layers=3, width=5)
    p5 = siren.init_params(arch5, 2, generator=torch.Generator().manual_seed(1))
    c5 = TensorBank.from_params(p5, arch5).to_layout("compact")
    parts5 = {name: getattr(c5, name) for name in c5._fields()}
    masks = parts5["hidden_masks"].clone()
    masks[1, -1] |= 1
    with pytest.raises(InrUsageError, match="padding bit"):
        TensorBank(arch5, **{**parts5, "hidden_masks": masks})


def test_compact_load_detects_mask_nnz_mismatch(tmp_path):
    arch = Architecture(sine_layers=2, width=8)
    path = tmp_path / "d.inr"
    write_inr(path, arch, 5, prune=0.3)
    with InrFile(path) as f:
        index = f.index.copy()
        index["nnz"][2] += 1
        index["nnz"][3] -= 1  # same total, but two masks disagree with their counts
        f.index = index
        with pytest.raises(InrFormatError, match=r"index\[2\]\.nnz"):
            TensorBank.from_file(f, "cpu", layout="compact")


def test_from_params_quantizes_and_validates():
    arch = Architecture(sine_layers=4, width=10)
    p = siren.init_params(arch, 3, generator=torch.Generator().manual_seed(0))
    bank = TensorBank.from_params(p, arch)
    assert bank.hidden_w.dtype == torch.int8 and bank.hidden_w.abs().max() == 127
    deq = bank.params(torch.arange(3)).hidden_w
    assert (deq - p.hidden_w).abs().max() <= bank.hidden_scale.max() / 2 + 1e-7
    assert bank.hidden_dtype == "int8" and len(bank) == 3 and bank.w0 == 30.0
    with pytest.raises(InrUsageError, match="hidden_w has shape"):
        TensorBank(arch, first_w=bank.first_w, first_b=bank.first_b, hidden_w=bank.hidden_w[:, :2].contiguous(),
                   hidden_scale=bank.hidden_scale, hidden_b=bank.hidden_b, last_w=bank.last_w, last_b=bank.last_b)
    with pytest.raises(InrUsageError, match="hidden_dtype"):
        TensorBank.from_params(p, arch, hidden_dtype="int4")
    with pytest.raises(InrUsageError, match="unknown device .gpu0."):
        TensorBank.from_file("unused.inr", device="gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_device_without_cuda_is_a_usage_error():
    with pytest.raises(InrUsageError, match="CUDA is not available"):
        TensorBank.from_file("unused.inr", device="cuda")


@cuda
@pytest.mark.gpu
def test_cuda_upload_equals_cpu_bank(tmp_path):
    arch = Architecture(sine_layers=4, width=20)
    path = tmp_path / "d.inr"
    write_inr(path, arch, 37, prune=0.2, chunk_images=8)
    cpu = TensorBank.from_file(path, "cpu", layout="dense")
    gpu = TensorBank.from_file(path, "cuda", layout="dense")
    assert gpu.device.type == "cuda" and gpu.load_seconds > 0
    for name in ("first_w", "first_b", "hidden_w", "hidden_scale", "hidden_b", "last_w", "last_b", "labels",
                 "heights", "widths"):
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name
    compact_cpu = TensorBank.from_file(path, "cpu", layout="compact")
    compact = TensorBank.from_file(path, "cuda", layout="compact")
    for name in compact._fields():
        assert torch.equal(getattr(compact, name).cpu(), getattr(compact_cpu, name)), name
    half = tmp_path / "half.inr"  # float16 first/last layers and biases stay float16 on the device
    write_inr(half, arch, 37, prune=0.2, chunk_images=8, float_dtype="float16")
    for layout in ("dense", "compact"):
        gpu, cpu = TensorBank.from_file(half, "cuda", layout=layout), TensorBank.from_file(half, "cpu", layout=layout)
        assert gpu.float_dtype == "float16"
        for name in gpu._fields():
            assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), (layout, name)
        idx = torch.arange(37, device="cuda")
        assert (decode(gpu, idx, 24) - decode(cpu, idx.cpu(), 24).cuda()).abs().max().item() <= 2e-3


def test_pinned_staging_copies_every_chunk_and_reuses_a_buffer_only_after_its_copy(monkeypatch):
    # The CUDA staging logic with CPU stand-ins for pinned memory, streams and events: every chunk lands in its
    # destination, work passed as `then` sees the copied values, and a buffer is refilled only after the
    # event recorded for its previous copy was waited on.
    from inrfmt import bank as bank_module

    events = []

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

        def synchronize(self):
            pass

    class Event:
        def __init__(self):
            self.waited = False
            events.append(self)

        def record(self, stream):
            pass

        def synchronize(self):
            self.waited = True

    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    rng = np.random.default_rng(0)
    chunks = [rng.integers(-2**31, 2**31, size=(rows, 3), dtype=np.int32) for rows in (4, 1, 3, 4, 2)]
    dst = torch.zeros((sum(len(c) for c in chunks), 3), dtype=torch.int32)
    staging = bank_module._PinnedStaging(4 * 3, torch.int32, torch.device("cpu"))
    seen, start = [], 0
    for k, chunk in enumerate(chunks):
        # chunk k reuses buffer k % 2: the copy of chunk k - 2 must have been waited on first
        target = dst[start:start + len(chunk)]
        staging.copy(k, chunk, target, then=lambda t=target: seen.append(t.clone()))
        assert all(e.waited for e in events[:k - 1]) and not any(e.waited for e in events[max(0, k - 1):])
        start += len(chunk)
    staging.close()
    assert torch.equal(dst, torch.from_numpy(np.concatenate(chunks)))
    assert all(torch.equal(s, torch.from_numpy(c)) for s, c in zip(seen, chunks))
