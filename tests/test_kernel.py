"""The fused Triton decoder against the torch reference.

On CPU the kernel runs in triton's interpreter: the kernel object is created lazily by triton.jit, which
reads TRITON_INTERPRET when it wraps the function, so setting the variable with monkeypatch before the first
call is enough (no subprocess; the CUDA-compiled kernel is cached separately). The ahead-of-time compile
tests build the real GPU binary (PTX + cubin via triton's bundled ptxas) for sm_80 and sm_90 without a GPU.
Tests marked `gpu` run the compiled kernel on CUDA (tools/gpu_check.sh).
"""
import os
import shutil
import subprocess

import pytest
import torch

triton = pytest.importorskip("triton")

from inrfmt import siren  # noqa: E402
from inrfmt.bank import TensorBank  # noqa: E402
from inrfmt.decode import decode, decode_torch  # noqa: E402
from inrfmt.errors import InrUsageError  # noqa: E402
from inrfmt.spec import Architecture  # noqa: E402
from inrfmt.kernels import siren_decode  # noqa: E402
from inrfmt.kernels.siren_decode import decode_triton, expand_hidden  # noqa: E402
from tools.kernel_compile import compile_expand_for_target, compile_for_target  # noqa: E402

TOL = 2e-3  # max abs error on [0, 1] pixels
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def guarded_bank(sine_layers, width, n, hidden_dtype, seed=0):
    """A bank whose every tensor is a prefix view of a larger buffer filled with poison after the real data.

    An unmasked read of a padded row/column past the last image (the prototype's width-64 bug) then picks up
    NaN (float tensors) or 127s (int8) and the comparison with the torch path fails.
    """
    arch = Architecture(sine_layers=sine_layers, width=width)
    params = siren.init_params(arch, n, generator=torch.Generator().manual_seed(seed))
    bank = TensorBank.from_params(params, arch, hidden_dtype=hidden_dtype)
    guarded = {}
    for name in ("first_w", "first_b", "hidden_w", "hidden_scale", "hidden_b", "last_w", "last_b"):
        t = getattr(bank, name)
        poison = 127 if t.dtype == torch.int8 else float("nan")
        buf = torch.full((t.numel() + 64 * 64 * 4,), poison, dtype=t.dtype)
        buf[:t.numel()] = t.reshape(-1)
        guarded[name] = buf[:t.numel()].view(t.shape)
    return TensorBank(arch, labels=bank.labels, heights=bank.heights, widths=bank.widths, **guarded)


def random_theta(b, seed):
    g = torch.Generator().manual_seed(seed)
    theta = torch.zeros(b, 2, 3)
    scale = 0.5 + torch.rand(b, 2, generator=g)
    flip = torch.where(torch.rand(b, 2, generator=g) < 0.5, -1.0, 1.0)
    theta[:, 0, 0] = scale[:, 0] * flip[:, 0]
    theta[:, 1, 1] = scale[:, 1] * flip[:, 1]
    theta[:, :, 2] = torch.rand(b, 2, generator=g) - 0.5
    theta[:, 0, 1] = 0.2 * (torch.rand(b, generator=g) - 0.5)  # a little shear/rotation
    return theta


CASES = [  # sine_layers, width, hidden dtype, size
    (3, 15, "int8", (8, 8)),
    (1, 15, "int8", (12, 20)),
    (10, 28, "int8", (12, 20)),
    (3, 28, "float16", (8, 8)),
    (10, 40, "int8", (8, 8)),        # Mini-ImageNet width: padded to 64
    (3, 40, "float32", (12, 20)),
    (2, 32, "int8", (5, 7)),
    (2, 17, "float16", (8, 8)),       # held as 16 + 16 units
    (3, 48, "int8", (6, 6)),          # 32 + 16 exactly
]


def test_width_blocks():
    from inrfmt.kernels.siren_decode import width_blocks

    assert width_blocks(40) == (32, 16) and width_blocks(40, split=False) == (64, 0)
    assert width_blocks(28) == (32, 0) and width_blocks(15) == (16, 0) and width_blocks(32) == (32, 0)
    assert width_blocks(48) == (32, 16) and width_blocks(17) == (32, 0) and width_blocks(80) == (64, 16)
    for w in range(1, 300):
        wa, wb = width_blocks(w)
        assert wa + wb >= w and wa >= 16 and (wb == 0 or wb >= 16)


@pytest.mark.parametrize("sine_layers,width,hidden_dtype,size", CASES)
def test_interpreted_kernel_matches_torch(interpret, sine_layers, width, hidden_dtype, size):
    bank = guarded_bank(sine_layers, width, 5, hidden_dtype)
    idx = [4, 0, 2]  # includes the last image: padded reads past it would hit the poison
    theta = random_theta(3, seed=width)
    for th in (None, theta):
        ref = decode_torch(bank, idx, size, th)
        fast = decode(bank, idx, size, th, backend="triton")
        assert fast.shape == ref.shape == (3, 3, *size)
        assert torch.isfinite(fast).all()
        assert (fast - ref).abs().max().item() <= TOL
        exact = decode_triton(bank, idx, size, th, fp16_dot=False)
        assert (exact - ref).abs().max().item() <= 1e-5
    # The single padded block (the prototype's layout) gives the same pixels as the split one.
    unsplit = decode_triton(bank, idx, size, theta, split_width=False, fp16_dot=False)
    assert (unsplit - decode_torch(bank, idx, size, theta)).abs().max().item() <= 1e-5


def test_float16_first_last_layers_and_biases(interpret):
    # A bank of a --float-dtype float16 file: the kernel upcasts those loads; same pixels as float32 copies.
    bank = guarded_bank(3, 40, 4, "int8")
    fields = {name: getattr(bank, name) for name in ("first_w", "first_b", "hidden_w", "hidden_scale", "hidden_b",
                                                     "last_w", "last_b")}
    half = {k: (v.half() if k in ("first_w", "first_b", "hidden_b", "last_w", "last_b") else v)
            for k, v in fields.items()}
    bank16 = TensorBank(bank.arch, **half)
    bank32 = TensorBank(bank.arch, **{k: (v.float() if v.dtype == torch.float16 else v) for k, v in half.items()})
    idx, theta = [3, 0], random_theta(2, seed=2)
    got = decode_triton(bank16, idx, (6, 10), theta, fp16_dot=False)
    assert torch.equal(got, decode_triton(bank32, idx, (6, 10), theta, fp16_dot=False))
    assert (got - decode_torch(bank16, idx, (6, 10), theta)).abs().max().item() <= 1e-5


def test_range_reduced_sine_path_matches(interpret):
    # The reduction used before sin.approx on GPU, checked here with tl.sin; theta zooms out so |args| grow.
    bank = guarded_bank(4, 28, 3, "int8")
    theta = torch.tensor([[[3.0, 0, 0.5], [0, -3.0, 0]]]).expand(3, 2, 3)
    ref = decode_torch(bank, [0, 1, 2], (8, 12), theta)
    got = decode_triton(bank, [0, 1, 2], (8, 12), theta, range_reduce=True, fp16_dot=False)
    assert (got - ref).abs().max().item() <= 1e-5


def test_output_dtypes_layouts_and_out_buffer(interpret):
    bank = guarded_bank(3, 15, 4, "int8")
    ref = decode_torch(bank, [1, 3], (6, 10))
    for dtype in (torch.float16, torch.bfloat16):
        got = decode(bank, [1, 3], (6, 10), backend="triton", dtype=dtype)
        assert got.dtype == dtype and (got.float() - ref).abs().max().item() <= TOL + 4e-3
    out = torch.full((2, 3, 6, 10), float("nan")).to(memory_format=torch.channels_last)
    got = decode(bank, [1, 3], (6, 10), backend="triton", out=out)
    assert got is out and got.is_contiguous(memory_format=torch.channels_last)
    assert (got - ref).abs().max().item() <= TOL
    # Tiles that straddle the end of the image (35 pixels, 16-pixel tiles) and an explicit warp count.
    got = decode_triton(bank, [3, 1, 1], (5, 7), block_pixels=16, num_warps=2)
    assert (got - decode_torch(bank, [3, 1, 1], (5, 7))).abs().max().item() <= TOL
    assert decode(bank, [], 4, backend="triton").shape == (0, 3, 4, 4)


def test_usage_errors(interpret, monkeypatch):
    bank = guarded_bank(2, 15, 2, "int8")
    with pytest.raises(InrUsageError, match="interpreter"):
        decode_triton(bank, [0], 4, fast_sin=True)
    with pytest.raises(InrUsageError, match="block_pixels"):
        decode_triton(bank, [0], 4, block_pixels=24)
    with pytest.raises(InrUsageError, match="out of range"):
        decode(bank, [2], 4, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(InrUsageError, match="CUDA"):
        decode_triton(bank, [0], 4)


def guarded_compact_bank(sine_layers, width, n, hidden_dtype, prune, seed=0, device="cpu"):
    """A compact bank (prune of the hidden weights zeroed) whose values/masks/offsets are followed by poison,
    on `device`, and the same weights as a dense bank."""
    arch = Architecture(sine_layers=sine_layers, width=width)
    params = siren.init_params(arch, n, generator=torch.Generator().manual_seed(seed))
    keep = torch.rand(params.hidden_w.shape, generator=torch.Generator().manual_seed(seed + 1)) >= prune
    dense = TensorBank.from_params(params._replace(hidden_w=params.hidden_w * keep), arch, hidden_dtype=hidden_dtype)
    compact = dense.to_layout("compact")
    guarded = {name: getattr(compact, name).to(device) for name in ("labels", "heights", "widths")}
    for name in compact._fields():
        if name in guarded:
            continue
        t = getattr(compact, name)
        poison = {torch.int8: 127, torch.uint8: 255, torch.int64: 2 ** 40}.get(t.dtype, float("nan"))
        buf = torch.full((t.numel() + 4096,), poison, dtype=t.dtype, device=device)
        buf[:t.numel()] = t.reshape(-1).to(device)
        guarded[name] = buf[:t.numel()].view(t.shape)
    return dense.to(device), TensorBank(arch, **guarded)


@pytest.mark.parametrize("sine_layers,width,hidden_dtype,prune", [
    (3, 13, "int8", 0.3),      # 338 bits per image: padding bits in the last mask byte
    (10, 40, "int8", 0.255),   # Mini-ImageNet: 14400 bits, several expansion blocks per image
    (2, 17, "float16", 0.5),
    (3, 15, "float32", 0.0),
    (2, 9, "int8", 1.0),       # everything pruned: no values at all
])
def test_interpreted_compact_expansion_and_decode(interpret, sine_layers, width, hidden_dtype, prune):
    dense, compact = guarded_compact_bank(sine_layers, width, 6, hidden_dtype, prune)
    assert compact.layout == "compact" and compact.nbytes < dense.nbytes or prune == 0
    idx = torch.tensor([5, 0, 3, 5])  # the last image, twice
    expanded = expand_hidden(compact, idx)
    assert expanded.dtype == dense.hidden_w.dtype and torch.equal(expanded, dense.hidden_w[idx])
    assert torch.equal(compact.hidden_dense(idx), dense.hidden_w[idx])
    theta = random_theta(4, seed=7)
    got = decode_triton(compact, idx, (6, 9), theta, fp16_dot=False)
    assert torch.equal(got, decode_triton(dense, idx, (6, 9), theta, fp16_dot=False))
    assert (decode(compact, idx, (6, 9), theta, backend="triton") - decode_torch(dense, idx, (6, 9), theta)
            ).abs().max().item() <= TOL
    # An out-of-range device index expands to zeros and decodes to NaN, as with a dense bank.
    bad = expand_hidden(compact, torch.tensor([6, -1, 1]))
    assert (bad[:2] == 0).all() and torch.equal(bad[2], dense.hidden_w[1])


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return os.path.exists(get_ptxas(90).path)
    except Exception:
        return False


@pytest.mark.skipif(not _ptxas_available(), reason="triton's bundled ptxas is not available")
@pytest.mark.parametrize("capability,width,hidden,hidden_dtype,out_dtype,fast_sin", [
    (80, 40, 9, "int8", "float32", True),     # width 40 padded to one block of 64 (split_width=False)
    (90, 28, 9, "int8", "float32", True),     # the paper's 10x28 on Hopper: wgmma + sin.approx
    (90, 40, 9, "int8", "bfloat16", True),    # width 40 held as 32 + 16
    (80, 15, 2, "float16", "float16", False),  # CIFAR 3x15 on Ampere, libdevice sine
    (80, 15, 0, "float32", "float32", True),  # no hidden layers
])
def test_kernel_compiles_for_gpu_without_one(capability, width, hidden, hidden_dtype, out_dtype, fast_sin):
    # float16 first/last layers and biases (a --float-dtype float16 file) with the float16 hidden-weight case.
    compiled = compile_for_target(width, hidden, capability=capability, hidden_dtype=hidden_dtype,
                                  out_dtype=out_dtype, fast_sin=fast_sin, split_width=capability == 90,
                                  float_dtype="float16" if hidden_dtype == "float16" else "float32")
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"]
    assert ("sin.approx.f32" in ptx) == fast_sin
    if hidden:
        assert "mma" in ptx  # tensor-core matmuls, not a scalar loop
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if shutil.which(cuobjdump) or os.path.exists(cuobjdump):
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                   text=True).stdout
        assert "LOCAL:0" in usage, usage  # no register spills to local memory


class _Sm90Driver:
    """Just enough of a triton driver for JITFunction.warmup to bind, specialize and compile for sm_90."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


@pytest.mark.skipif(not _ptxas_available(), reason="triton's bundled ptxas is not available")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a real GPU runs this path in the gpu tests")
def test_launch_path_binds_and_compiles_both_kernels_for_sm90_without_a_gpu():
    # decode_triton's own launch path (the argument binder, constexpr specialization with the jitted sine
    # helper as a constexpr, the kernel cache) up to the compiled binary, as on an H100 - only the launch
    # itself is left out. Fresh JITFunctions, so nothing compiled for the fake driver is cached elsewhere.
    from triton.runtime import driver

    arch = Architecture(sine_layers=10, width=40)
    bank = TensorBank.from_params(siren.init_params(arch, 8, generator=torch.Generator().manual_seed(0)), arch)
    compact = bank.to_layout("compact")
    idx, theta, out = torch.arange(4), torch.zeros(4, 2, 3), torch.empty(4, 3, 16, 16)
    decode_kernel, sine = triton.jit(siren_decode._siren_decode_kernel), triton.jit(siren_decode._sine)
    expand_kernel = triton.jit(siren_decode._expand_hidden_kernel)
    previous = driver._active  # None until first used; reset_active() would create a CUDA driver here and fail
    driver.set_active(_Sm90Driver())
    try:
        for by_batch in (False, True):
            hidden = torch.empty(4, 9, 40, 40, dtype=torch.int8) if by_batch else bank.hidden_w
            args = (idx, theta, out, bank.first_w, bank.first_b, hidden, bank.hidden_scale, bank.hidden_b,
                    bank.last_w, bank.last_b, bank.num_images, 16, 16, 4, *out.stride(), 30.0, 30.0, float("nan"))
            meta = siren_decode._constexprs(40, 9, 64, True, True, True, True, True, by_batch)
            compiled = decode_kernel.warmup(*args, **meta, SINE=sine, grid=(16,), num_warps=4)
            assert "sin.approx.f32" in compiled.asm["ptx"] and compiled.asm["cubin"]
            assert decode_kernel.warmup(*args, **meta, SINE=sine, grid=(16,), num_warps=4) is compiled  # cached
        compiled = expand_kernel.warmup(idx, compact.hidden_masks, compact.hidden_offsets, compact.hidden_values,
                                        torch.empty(4, 9, 40, 40, dtype=torch.int8), 8,
                                        compact.hidden_masks.shape[1], TOTAL=compact.hidden_total, BLOCK=1024,
                                        INTERPRETED=False, ADD=None, grid=(4,), num_warps=4)
        assert compiled.asm["cubin"]
    finally:
        driver.set_active(previous)


@pytest.mark.skipif(not _ptxas_available(), reason="triton's bundled ptxas is not available")
@pytest.mark.parametrize("capability", [80, 90])
def test_compact_bank_kernels_compile_for_gpu_without_one(capability):
    # The decode kernel reading a batch's expanded weights, and the expansion kernel itself.
    compiled = compile_for_target(40, 9, capability=capability, hidden_by_batch=True, split_width=capability == 90)
    assert compiled.asm["cubin"] and "mma" in compiled.asm["ptx"]
    for total, dtype in ((9 * 40 * 40, "int8"), (2 * 15 * 15, "float16")):
        expand = compile_expand_for_target(total, capability=capability, hidden_dtype=dtype)
        assert expand.asm["cubin"]


# -- on a GPU (tools/gpu_check.sh) -------------------------------------------------------------------
@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("sine_layers,width,hidden_dtype", [(10, 28, "int8"), (10, 32, "int8"), (10, 40, "int8"),
                                                            (3, 15, "int8"), (4, 40, "float16"),
                                                            (3, 28, "float32"), (1, 15, "int8")])
@pytest.mark.parametrize("fast_sin", [True, False])
def test_cuda_kernel_matches_torch(sine_layers, width, hidden_dtype, fast_sin):
    arch = Architecture(sine_layers=sine_layers, width=width)
    params = siren.init_params(arch, 64, generator=torch.Generator().manual_seed(1))
    bank = TensorBank.from_params(params, arch, hidden_dtype=hidden_dtype, device="cuda")
    idx = torch.randint(0, 64, (48,), device="cuda")
    theta = random_theta(48, seed=3).cuda()
    for size in ((32, 32), (84, 84), (61, 97)):
        for th in (None, theta):
            ref = decode_torch(bank, idx, size, th)
            got = decode_triton(bank, idx, size, th, fast_sin=fast_sin)
            torch.cuda.synchronize()
            err = (got - ref).abs().max().item()
            assert err <= TOL, f"{sine_layers}x{width} {hidden_dtype} {size} fast_sin={fast_sin}: {err}"
    assert decode(bank, idx, 16).data_ptr() != 0  # default backend on CUDA is triton and runs


@cuda
@pytest.mark.gpu
def test_cuda_width_64_padding_last_image_and_invalid_index():
    # The prototype's crash: width 40 padded to 64, reading the last images of an exactly-sized bank.
    arch = Architecture(sine_layers=10, width=40)
    params = siren.init_params(arch, 257, generator=torch.Generator().manual_seed(2))
    bank = TensorBank.from_params(params, arch, device="cuda")
    idx = torch.arange(257 - 64, 257, device="cuda")
    got = decode_triton(bank, idx, (84, 84))
    torch.cuda.synchronize()
    assert (got - decode_torch(bank, idx, (84, 84))).abs().max().item() <= TOL
    bad = torch.tensor([0, 257, -1], device="cuda")  # device indices are not range-checked on the host
    got = decode_triton(bank, bad, 8)
    torch.cuda.synchronize()
    assert torch.isfinite(got[0]).all() and torch.isnan(got[1:]).all()


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("sine_layers,width,prune", [(10, 40, 0.255), (10, 28, 0.156), (3, 15, 0.5)])
def test_cuda_compact_bank_matches_dense(sine_layers, width, prune):
    dense, compact = guarded_compact_bank(sine_layers, width, 300, "int8", prune, device="cuda")
    idx = torch.randint(0, 300, (96,), device="cuda")
    assert torch.equal(expand_hidden(compact, idx), dense.hidden_w[idx])
    theta = random_theta(96, seed=5).cuda()
    got = decode(compact, idx, 56, theta, backend="triton")
    ref = decode(dense, idx, 56, theta, backend="triton")
    torch.cuda.synchronize()
    assert torch.equal(got, ref)
    assert (got - decode_torch(dense, idx, 56, theta)).abs().max().item() <= TOL


@cuda
@pytest.mark.gpu
def test_cuda_channels_last_bf16_and_out_reuse():
    arch = Architecture(sine_layers=10, width=28)
    params = siren.init_params(arch, 32, generator=torch.Generator().manual_seed(4))
    bank = TensorBank.from_params(params, arch, device="cuda")
    idx = torch.arange(32, device="cuda")
    ref = decode_torch(bank, idx, 64)
    out = torch.empty(32, 3, 64, 64, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    got = decode(bank, idx, 64, out=out, dtype=torch.bfloat16)
    assert got is out
    assert (got.float() - ref).abs().max().item() <= TOL + 4e-3


@cuda
@pytest.mark.gpu
def test_cuda_large_bank_int64_offsets():
    # N*H*W*W > 2^31 int8 elements: image offsets must not wrap in int32 (2.2 GB of hidden weights).
    arch = Architecture(sine_layers=10, width=40)
    n = (2 ** 31) // (9 * 40 * 40) + 1000
    free, _ = torch.cuda.mem_get_info()
    if free < 6 * 2 ** 30:
        pytest.skip("needs ~6 GB of free GPU memory")
    small = siren.init_params(arch, 2, generator=torch.Generator().manual_seed(5))
    two = TensorBank.from_params(small, arch, device="cuda")
    big = {name: getattr(two, name)[:1].expand(n, *getattr(two, name).shape[1:]).contiguous()
           for name in ("first_w", "first_b", "hidden_w", "hidden_scale", "hidden_b", "last_w", "last_b")}
    for name in big:  # the last image is image 1 of `two`, every other one image 0
        big[name][-1] = getattr(two, name)[1]
    bank = TensorBank(arch, **big)
    got = decode_triton(bank, torch.tensor([n - 1, 0], device="cuda"), 16)
    ref = decode_torch(two, torch.tensor([1, 0], device="cuda"), 16)
    torch.cuda.synchronize()
    assert (got - ref).abs().max().item() <= TOL
