"""The torch reference decoder and the backend dispatch (CPU); CUDA memory checks run under tools/gpu_check.sh."""
import math
import os

import pytest
import torch

from inrfmt import decode as decode_mod
from inrfmt import siren
from inrfmt.bank import TensorBank
from inrfmt.bench import benchmark
from inrfmt.decode import decode, decode_torch
from inrfmt.errors import InrUsageError
from inrfmt.spec import Architecture

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_bank(sine_layers=3, width=15, n=6, hidden_dtype="int8", seed=0, device="cpu"):
    arch = Architecture(sine_layers=sine_layers, width=width)
    params = siren.init_params(arch, n, generator=torch.Generator().manual_seed(seed))
    return TensorBank.from_params(params, arch, hidden_dtype=hidden_dtype, device=device)


def naive_decode(bank, index, h, w):
    """One image, written out layer by layer from the formulas in docs/internals.md (no batching)."""
    arch = bank.arch
    ys = torch.tensor([-1 + (2 * i + 1) / h for i in range(h)], dtype=torch.float64)
    xs = torch.tensor([-1 + (2 * j + 1) / w for j in range(w)], dtype=torch.float64)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    c = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
    f64 = torch.float64
    x = torch.sin(arch.first_w0 * (c @ bank.first_w[index].to(f64).T + bank.first_b[index].to(f64)))
    for layer in range(arch.hidden_layers):
        wl = bank.hidden_w[index, layer].to(f64) * bank.hidden_scale[index, layer].to(f64)
        x = torch.sin(arch.w0 * (x @ wl.T + bank.hidden_b[index, layer].to(f64)))
    o = x @ bank.last_w[index].to(f64).T + bank.last_b[index].to(f64)
    return (0.5 * o + 0.5).clamp(0, 1).T.reshape(3, h, w).float()


@pytest.mark.parametrize("sine_layers,width,hidden_dtype", [(3, 15, "int8"), (1, 8, "int8"),
                                                             (4, 28, "float16"), (2, 20, "float32")])
def test_decode_torch_matches_naive_per_image_loop(sine_layers, width, hidden_dtype):
    bank = make_bank(sine_layers, width, n=5, hidden_dtype=hidden_dtype)
    indices = [4, 0, 2, 2]
    got = decode_torch(bank, indices, (7, 10))
    assert got.shape == (4, 3, 7, 10) and got.dtype == torch.float32
    for b, i in enumerate(indices):
        torch.testing.assert_close(got[b], naive_decode(bank, i, 7, 10), atol=2e-5, rtol=0)


@pytest.mark.parametrize("size", [5, (6, 9), (16, 24), (31, 3)])
def test_any_output_size_including_upsampling(size):
    bank = make_bank()
    h, w = (size, size) if isinstance(size, int) else size
    got = decode(bank, [1, 3], size)
    assert got.shape == (2, 3, h, w)
    for b, i in enumerate([1, 3]):
        torch.testing.assert_close(got[b], naive_decode(bank, i, h, w), atol=2e-5, rtol=0)


def test_identity_theta_equals_no_theta_and_flip_theta_flips():
    bank = make_bank()
    idx = torch.tensor([0, 1, 5])
    plain = decode(bank, idx, (8, 11))
    identity = torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(3, 2, 3)
    torch.testing.assert_close(decode(bank, idx, (8, 11), identity), plain, atol=1e-6, rtol=0)
    hflip = torch.tensor([[-1.0, 0, 0], [0, 1, 0]]).expand(3, 2, 3)
    torch.testing.assert_close(decode(bank, idx, (8, 11), hflip), plain.flip(-1), atol=1e-4, rtol=0)
    vflip = torch.tensor([[1.0, 0, 0], [0, -1, 0]]).expand(3, 2, 3)
    torch.testing.assert_close(decode(bank, idx, (8, 11), vflip), plain.flip(-2), atol=1e-4, rtol=0)


def test_theta_is_per_image_and_scales_coordinates():
    bank = make_bank()
    # Zooming in by 2 about the centre: an 8x8 decode of theta=diag(.5,.5) equals the centre 8x8 of a 16x16 decode.
    theta = torch.tensor([[[0.5, 0, 0], [0, 0.5, 0]], [[1.0, 0, 0], [0, 1, 0]]])
    got = decode(bank, [2, 2], 8, theta)
    full = decode(bank, [2], 16)[0]
    torch.testing.assert_close(got[0], full[:, 4:12, 4:12], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1], decode(bank, [2], 8)[0], atol=1e-6, rtol=0)


def test_pixel_chunking_gives_the_same_result(monkeypatch):
    bank = make_bank(width=12)
    whole = decode_torch(bank, [0, 1, 2], (9, 13))
    monkeypatch.setattr(decode_mod, "_TORCH_CHUNK_ELEMENTS", 3 * 12 * 5)  # 5 pixels per chunk
    torch.testing.assert_close(decode_torch(bank, [0, 1, 2], (9, 13)), whole, atol=1e-6, rtol=0)


def test_out_buffer_is_reused_in_both_layouts():
    bank = make_bank()
    expected = decode(bank, [3, 4], (6, 7))
    out = torch.full((2, 3, 6, 7), float("nan"))
    assert decode(bank, [3, 4], (6, 7), out=out) is out
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    out_cl = torch.full((2, 3, 6, 7), float("nan")).to(memory_format=torch.channels_last)
    got = decode(bank, [3, 4], (6, 7), out=out_cl)
    assert got is out_cl and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_output(dtype):
    bank = make_bank()
    got = decode(bank, [0, 1], 8, dtype=dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), decode(bank, [0, 1], 8), atol=4e-3, rtol=0)


def test_bad_arguments_raise_usage_errors(monkeypatch):
    bank = make_bank(n=4)
    with pytest.raises(InrUsageError, match="index 4 is out of range"):
        decode(bank, [0, 4], 8)
    with pytest.raises(InrUsageError, match="index -1"):
        decode(bank, torch.tensor([-1]), 8)
    with pytest.raises(InrUsageError, match="integers"):
        decode(bank, torch.tensor([0.5]), 8)
    with pytest.raises(InrUsageError, match="size"):
        decode(bank, [0], (0, 4))
    with pytest.raises(InrUsageError, match="size"):
        decode(bank, [0], "big")
    with pytest.raises(InrUsageError, match="theta"):
        decode(bank, [0, 1], 8, torch.zeros(1, 2, 3))
    with pytest.raises(InrUsageError, match="out is"):
        decode(bank, [0, 1], 8, out=torch.empty(2, 3, 8, 9))
    with pytest.raises(InrUsageError, match="out is"):
        decode(bank, [0, 1], 8, out=torch.empty(2, 3, 8, 8, dtype=torch.float16))
    with pytest.raises(InrUsageError, match="dtype"):
        decode(bank, [0, 1], 8, dtype=torch.int32)
    with pytest.raises(InrUsageError, match="unknown decode backend 'cuda'"):
        decode(bank, [0], 8, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InrUsageError, match="TRITON_INTERPRET"):
        decode(bank, [0], 8, backend="triton")


def test_default_backend_on_cpu_is_torch_and_empty_batch_works():
    bank = make_bank()
    assert decode_mod.default_backend(bank) == "torch"
    torch.testing.assert_close(decode(bank, [1], 5), decode_torch(bank, [1], 5), atol=0, rtol=0)
    assert decode(bank, [], 5).shape == (0, 3, 5, 5)


def test_benchmark_reports_throughput_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bank = make_bank(n=8)
    result = benchmark(bank, 8, batch_size=4, backends=["torch"], warmup=1, min_seconds=0.05, max_iters=5)
    stats = result["backends"]["torch"]
    assert stats["img_per_s"] > 0 and stats["images"] >= 4
    assert stats["max_abs_err_vs_torch"] == 0.0
    assert result["size"] == [8, 8] and result["arch"] == "3x15"
    with pytest.raises(InrUsageError):
        benchmark(bank, 8, batch_size=4, backends=["jpeg"])
    with pytest.raises(InrUsageError, match="needs a CUDA bank"):
        benchmark(bank, 8, batch_size=4, backends=["triton"])


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_cuda_decode_with_out_allocates_nothing_per_call(backend, layout):
    if backend == "triton":
        pytest.importorskip("triton")
    bank = make_bank(10, 28, n=64, device="cuda").to_layout(layout)
    idx = torch.randint(0, 64, (32,), device="cuda")
    out = torch.empty(32, 3, 64, 64, device="cuda")
    decode(bank, idx, 64, backend=backend, out=out)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(50):
        decode(bank, idx, 64, backend=backend, out=out)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    # Temporaries: gathered (compact: expanded) weights and (torch path) bounded activation chunks only.
    limit = 4 * bank.nbytes + (0 if backend == "triton" else 16 * decode_mod._TORCH_CHUNK_ELEMENTS)
    assert torch.cuda.max_memory_allocated() - before <= limit + math.prod(out.shape) * 4


def test_automatic_triton_choice_falls_back_to_torch_once(monkeypatch):
    import inrfmt.kernels

    bank = make_bank()

    def broken(*args, **kwargs):
        raise RuntimeError("PTX .version 9.9 does not support .target sm_52")

    monkeypatch.setattr(inrfmt.kernels, "decode_triton", broken)
    monkeypatch.setattr(decode_mod, "_auto_triton_failed", None)
    with pytest.warns(RuntimeWarning, match="using the torch decoder"):
        got = decode_mod._decode_auto_triton(bank, [0, 2], 6, None, out=None, dtype=torch.float32)
    torch.testing.assert_close(got, decode_torch(bank, [0, 2], 6), atol=0, rtol=0)
    assert "sm_52" in decode_mod._auto_triton_failed
    assert decode_mod.default_backend(bank) == "torch"


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux) to read RSS")
def test_repeated_decodes_into_one_buffer_do_not_grow_memory():
    bank = make_bank(4, 20, n=32)
    idx = torch.arange(32)
    out = torch.empty(32, 3, 24, 24)

    def rss_bytes():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    for _ in range(5):  # warm-up: allocator pools reach their steady state
        decode(bank, idx, 24, out=out)
    before = rss_bytes()
    for _ in range(60):
        assert decode(bank, idx, 24, out=out) is out
    growth = rss_bytes() - before
    # One batch's temporaries are ~1.5 MB; a leak of them per call would add ~90 MB over 60 calls.
    assert growth < 8 * 2 ** 20, f"RSS grew by {growth / 2 ** 20:.1f} MiB over 60 decodes"
