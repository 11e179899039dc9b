"""The fused Triton decoder against the torch reference.

On CPU the kernel runs in triton's interpreter: the kernel object is created lazily by triton.jit, which
reads TRITON_INTERPRET when it wraps the function, so setting the variable with monkeypatch before the first
call is enough (no subprocess; the CUDA-compiled kernel is cached separately). The interpreter runs the fp16
path's arithmetic as the GPU does (fp16 operands, fp32 accumulation), so its error against the fp32 torch
path is the kernel's own; only sin.approx is GPU-only. The ahead-of-time compile tests build the real GPU
binary (PTX + cubin via triton's bundled ptxas) for sm_80 and sm_90 without a GPU. Tests marked `gpu` run the
compiled kernel on CUDA (tools/gpu_check.sh); they use few distinct kernel configurations, since each one
is a compile of several seconds on a cold machine.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from inrfmt import decode as decode_mod  # noqa: E402
from inrfmt import siren  # noqa: E402
from inrfmt.bank import TensorBank  # noqa: E402
from inrfmt.decode import decode, decode_torch  # noqa: E402
from inrfmt.errors import InrUsageError  # noqa: E402
from inrfmt.spec import Architecture  # noqa: E402
from inrfmt.kernels import siren_decode  # noqa: E402
from inrfmt.kernels.siren_decode import decode_triton, expand_hidden, kernel_config, program_tiles  # noqa: E402
from tools.kernel_compile import StandInDriver, compile_expand_for_target, compile_for_target  # noqa: E402

TOL = 5e-4  # max abs error on [0, 1] pixels of the fp16 path against the fp32 torch path
EXACT_TOL = 1e-5  # the fp32 ("ieee") path
DATA = Path(__file__).resolve().parent / "data"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def guarded_bank(sine_layers, width, n, hidden_dtype, seed=0, w0=30.0, first_w0=30.0, device="cpu"):
    """A bank whose every tensor is a prefix view of a larger buffer filled with poison after the real data.

    A read past the live region (a padded row/column of the last image, a wrong row stride) then picks up
    NaN (float tensors) or 127s (int8) and the comparison with the torch path fails.
    """
    arch = Architecture(sine_layers=sine_layers, width=width, w0=w0, first_w0=first_w0)
    params = siren.init_params(arch, n, generator=torch.Generator().manual_seed(seed))
    bank = TensorBank.from_params(params, arch, hidden_dtype=hidden_dtype)
    guarded = {}
    for name in ("first_w", "first_b", "hidden_w", "hidden_scale", "hidden_b", "last_w", "last_b"):
        t = getattr(bank, name)
        poison = 127 if t.dtype == torch.int8 else float("nan")
        buf = torch.full((t.numel() + 128 * 128 * 4,), poison, dtype=t.dtype, device=device)
        buf[:t.numel()] = t.reshape(-1).to(device)
        guarded[name] = buf[:t.numel()].view(t.shape)
    return TensorBank(arch, **guarded)


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


# Every way the width is held (see siren_decode's docstring): padded with the two constant-one units
# carrying the bias, padded by one unit (bias through the ones dot), not padded, padded 40 -> 64 with the
# top 16 units masked off; w0 != first_w0 in several.
CASES = [  # sine_layers, width, hidden dtype, size, w0, first_w0
    (3, 15, "int8", (8, 8), 30.0, 30.0),       # 15 -> 16: one spare unit, bias dot
    (1, 15, "int8", (12, 20), 30.0, 20.0),     # no hidden layer
    (10, 28, "int8", (12, 20), 25.0, 35.0),    # 28 -> 32, bias in the constant-one units
    (3, 28, "float16", (8, 8), 30.0, 30.0),
    (10, 40, "int8", (8, 8), 30.0, 30.0),      # 40 -> 64: pads 24 units, masks 16
    (3, 40, "float32", (12, 20), 20.0, 40.0),
    (2, 32, "int8", (5, 7), 30.0, 30.0),       # not padded: bias dot
    (2, 17, "float16", (8, 8), 30.0, 30.0),    # 17 -> 32
]


@pytest.mark.parametrize("sine_layers,width,hidden_dtype,size,w0,first_w0", CASES)
def test_interpreted_kernel_matches_torch(interpret, sine_layers, width, hidden_dtype, size, w0, first_w0):
    bank = guarded_bank(sine_layers, width, 5, hidden_dtype, w0=w0, first_w0=first_w0)
    idx = [4, 0, 2]  # includes the last image: padded reads past it would hit the poison
    for theta in (None, random_theta(3, seed=width)):
        ref = decode_torch(bank, idx, size, theta)
        fast = decode(bank, idx, size, theta, backend="triton")
        assert fast.shape == ref.shape == (3, 3, *size)
        assert torch.isfinite(fast).all()
        assert max_err(fast, ref) <= TOL
        # Two tiles per program, the last program of each image with fewer.
        exact = decode_triton(bank, idx, size, theta, fp16_dot=False, block_pixels=16, tiles_per_program=2)
        assert max_err(exact, ref) <= EXACT_TOL


def test_reference_conversions_decode_within_tolerance(interpret):
    # Trained weights (the pinned conversions of tests/data), int8 hidden + fp32 and fp16 + fp16 files.
    import inrfmt

    for name in ("fast_int8_masks.inr", "fast_f16_noprune_mixed.inr"):
        with inrfmt.open(DATA / name, device="cpu") as ds:
            idx = torch.arange(len(ds))
            theta = random_theta(len(ds), seed=1)
            ref = decode_torch(ds.bank, idx, (14, 14), theta)
            assert max_err(decode_triton(ds.bank, idx, (14, 14), theta), ref) <= TOL, name


def test_nan_propagation_matches_torch(interpret):
    # A NaN anywhere (a weight of any layer, a scale, a bias, theta) gives NaN exactly where torch gives it,
    # and every other pixel as torch.
    bank = guarded_bank(3, 28, 4, "float16")
    fields = {name: getattr(bank, name).clone() for name in ("first_w", "first_b", "hidden_w", "hidden_scale",
                                                             "hidden_b", "last_w", "last_b")}
    nan = float("nan")
    fields["first_w"][0, 3, 1] = nan     # image 0: every pixel
    fields["hidden_w"][1, 1, 5, 7] = nan  # image 1: every pixel (0 * NaN is NaN in both)
    fields["last_w"][2, 1, 4] = nan      # image 2: green only
    fields["last_b"][3, 2] = nan         # image 3: blue only
    theta = random_theta(5, seed=3)
    theta[4, 0, 2] = nan                 # batch entry 4: every pixel
    poisoned = TensorBank(bank.arch, **fields)
    idx = [0, 1, 2, 3, 3]
    ref = decode_torch(poisoned, idx, (6, 9), theta)
    for fp16_dot in (True, False):
        got = decode_triton(poisoned, idx, (6, 9), theta, fp16_dot=fp16_dot)
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        assert torch.isnan(ref[:2]).all() and torch.isnan(ref[4]).all()
        assert torch.isnan(ref[2, 1]).all() and not torch.isnan(ref[2, 0]).any()
        finite = ~torch.isnan(ref)
        assert max_err(got[finite], ref[finite]) <= TOL
    scales = dict(fields, hidden_scale=bank.hidden_scale.clone())
    scales["hidden_scale"][1, 0] = nan
    ref = decode_torch(TensorBank(bank.arch, **scales), [1, 0], 5)
    got = decode_triton(TensorBank(bank.arch, **scales), [1, 0], 5)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.isnan(ref[0]).all()


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
    assert max_err(got, decode_torch(bank16, idx, (6, 10), theta)) <= EXACT_TOL


def test_range_reduced_sine_path_matches(interpret):
    # The reduction used before sin.approx on GPU, checked here with tl.sin; theta zooms out so |z| grows.
    bank = guarded_bank(4, 28, 3, "int8")
    theta = torch.tensor([[[3.0, 0, 0.5], [0, -3.0, 0]]]).expand(3, 2, 3)
    ref = decode_torch(bank, [0, 1, 2], (8, 12), theta)
    got = decode_triton(bank, [0, 1, 2], (8, 12), theta, range_reduce=True, fp16_dot=False)
    assert max_err(got, ref) <= EXACT_TOL


def test_nets_too_large_to_stage_stream_their_weights(interpret):
    # More staged bytes than MAX_STAGED_BYTES (4 hidden layers held as 128 units), and more hidden layers
    # than MAX_STAGED_LAYERS: the dynamic layer loop, same pixels.
    assert not kernel_config(8, siren_decode.MAX_STAGED_LAYERS + 1).constexprs["STAGED"]
    assert not kernel_config(100, 4).constexprs["STAGED"] and kernel_config(100, 2).constexprs["STAGED"]
    bank = guarded_bank(5, 100, 3, "int8")
    theta = random_theta(2, seed=9)
    ref = decode_torch(bank, [2, 0], (4, 6), theta)
    assert max_err(decode_triton(bank, [2, 0], (4, 6), theta, fp16_dot=False), ref) <= EXACT_TOL
    assert max_err(decode_triton(bank, [2, 0], (4, 6), theta), ref) <= TOL


def test_output_dtypes_layouts_and_out_buffer(interpret):
    bank = guarded_bank(3, 15, 4, "int8")
    ref = decode_torch(bank, [1, 3], (6, 10))
    for dtype in (torch.float16, torch.bfloat16):
        got = decode(bank, [1, 3], (6, 10), backend="triton", dtype=dtype)
        assert got.dtype == dtype and max_err(got, ref) <= TOL + 4e-3  # + the output rounding
    out = torch.full((2, 3, 6, 10), float("nan")).to(memory_format=torch.channels_last)
    got = decode(bank, [1, 3], (6, 10), backend="triton", out=out)
    assert got is out and got.is_contiguous(memory_format=torch.channels_last)
    assert max_err(got, ref) <= TOL
    # A view whose channel stride is not h*w (every other channel of a 6-channel buffer), a single column.
    big = torch.full((2, 6, 6, 10), float("nan"))
    assert decode_triton(bank, [1, 3], (6, 10), out=big[:, ::2]) is not None
    assert max_err(big[:, ::2], ref) <= TOL and torch.isnan(big[:, 1::2]).all()
    assert max_err(decode_triton(bank, [1], (5, 1)), decode_torch(bank, [1], (5, 1))) <= TOL
    # Tiles that straddle the end of the image (35 pixels, 16-pixel tiles) and an explicit warp count.
    got = decode_triton(bank, [3, 1, 1], (5, 7), block_pixels=16, num_warps=2)
    assert max_err(got, decode_torch(bank, [3, 1, 1], (5, 7))) <= TOL
    assert decode(bank, [], 4, backend="triton").shape == (0, 3, 4, 4)


def test_usage_errors(interpret, monkeypatch):
    bank = guarded_bank(2, 15, 2, "int8")
    with pytest.raises(InrUsageError, match="interpreter"):
        decode_triton(bank, [0], 4, fast_sin=True)
    with pytest.raises(InrUsageError, match="block_pixels"):
        decode_triton(bank, [0], 4, block_pixels=24)
    with pytest.raises(InrUsageError, match="out of range"):
        decode(bank, [2], 4, backend="triton")
    with pytest.raises(InrUsageError, match="contiguous or channels_last"):
        decode(bank, [0], 4, backend="triton", out=torch.empty(1, 3, 8, 4)[:, :, ::2])
    with pytest.raises(InrUsageError, match="pixels per image"):
        decode_triton(bank, [0], (4096, 4096))
    wide = Architecture(sine_layers=2, width=200)
    wide_bank = TensorBank.from_params(siren.init_params(wide, 1), wide)
    with pytest.raises(InrUsageError, match="widths up to 128"):
        decode_triton(wide_bank, [0], 4)
    assert not siren_decode.supports(wide) and siren_decode.supports(bank.arch)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(InrUsageError, match="CUDA"):
        decode_triton(bank, [0], 4)


def test_kernel_config_and_program_tiles():
    c = kernel_config(28, 9).constexprs
    assert (c["WP"], c["ONES"], c["LIVE"], c["STAGED"]) == (32, 2, 32, True)
    c = kernel_config(40, 9).constexprs
    assert (c["WP"], c["ONES"], c["LIVE"]) == (64, 2, 48)  # units 48..63 masked: their sines are dropped
    assert kernel_config(15, 2).constexprs["ONES"] == 0 and kernel_config(32, 9).constexprs["ONES"] == 0
    assert not kernel_config(40, 9).constexprs["RANGE_REDUCE"]
    assert kernel_config(28, 9, range_reduce=True).constexprs["RANGE_REDUCE"]
    assert kernel_config(28, 9) is kernel_config(28, 9)  # cached
    # 392 tiles per 224x224 image at batch 256 on 132 SMs: 9 groups of at most 44 tiles.
    assert program_tiles(392, 256, 132) == 44
    for tiles in (1, 7, 392, 1000):
        for batch in (1, 8, 4096):
            per = program_tiles(tiles, batch, 132)
            groups = -(-tiles // per)
            assert 1 <= per <= tiles and tiles - (groups - 1) * per > per - groups  # balanced to one tile


def test_the_kernel_module_does_not_import_the_dispatcher():
    # decode.py imports the kernel lazily; the kernel takes its argument checks from decode_args.
    code = ("import sys; import inrfmt.kernels.siren_decode; "
            "assert 'inrfmt.decode' not in sys.modules, sorted(m for m in sys.modules if m.startswith('inrfmt'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr


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
    (4, 40, "int8", 0.255),    # width 40: 4800 bits, several expansion blocks per image
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
    ref = decode_torch(dense, idx, (6, 9), theta)
    assert max_err(decode(compact, idx, (6, 9), theta, backend="triton"), ref) <= TOL
    # An out-of-range device index expands to zeros and decodes to NaN, as with a dense bank.
    bad = expand_hidden(compact, torch.tensor([6, -1, 1]))
    assert (bad[:2] == 0).all() and torch.equal(bad[2], dense.hidden_w[1])


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return os.path.exists(get_ptxas(90).path)
    except Exception:
        return False


def _resource_usage(cubin: bytes) -> str:
    import tempfile

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not (shutil.which(cuobjdump) or os.path.exists(cuobjdump)):
        pytest.skip("triton's bundled cuobjdump is not available")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout


@pytest.mark.skipif(not _ptxas_available(), reason="triton's bundled ptxas is not available")
@pytest.mark.parametrize("capability,width,hidden,hidden_dtype,out_dtype,fast_sin", [
    (80, 40, 9, "int8", "float32", True),     # width 40 held as 64, mma.sync on Ampere
    (90, 28, 9, "int8", "float32", True),     # the paper's 10x28 on Hopper: wgmma + sin.approx
    (90, 40, 2, "int8", "bfloat16", True),    # 40 -> 64 on Hopper
    (80, 15, 2, "float16", "float16", False),  # CIFAR 3x15 on Ampere, libdevice sine, bias dot
    (90, 15, 0, "float32", "float32", True),  # no hidden layers
    (90, 100, 4, "int8", "float32", True),    # too large to stage: the streamed layer loop
])
def test_kernel_compiles_for_gpu_without_one(capability, width, hidden, hidden_dtype, out_dtype, fast_sin):
    # float16 first/last layers and biases (a --float-dtype float16 file) with the float16 hidden-weight case.
    compiled = compile_for_target(width, hidden, capability=capability, hidden_dtype=hidden_dtype,
                                  out_dtype=out_dtype, fast_sin=fast_sin,
                                  float_dtype="float16" if hidden_dtype == "float16" else "float32")
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"]
    assert ("sin.approx.f32" in ptx) == fast_sin
    assert "mma" in ptx  # tensor-core matmuls, not a scalar loop
    assert "LOCAL:0" in _resource_usage(compiled.asm["cubin"])  # no register spills to local memory


@pytest.mark.skipif(not _ptxas_available(), reason="triton's bundled ptxas is not available")
def test_static_report_meets_the_10x28_targets_on_sm90():
    # tools/kernel_report.py on the 10x28 net: the layer loop has no barrier and stays within 5 instructions
    # per activation element, with the issue bound of the static targets.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import kernel_report

    row = kernel_report.analyse(10, 28, True, 90)
    assert row["spilled_bytes"] == 0 and row["staged"] and not row["nested_sine_loop"]
    assert row["layer_loop"]["instructions_per_element"] <= 5.0
    assert row["layer_loop"]["conversions_per_element"] == 0  # no I2F: int8 dequantized by the bit trick
    assert 0.99 <= row["layer_loop"]["mufu_sin_per_element"] <= 1.01
    assert row["layer_loop"]["barriers_per_layer"] == 0  # the tile's barriers change the output's layout
    assert kernel_report.check([row]) == []
    h200 = row["devices"]["H200"]
    assert h200["programs_per_sm"] >= 4 and h200["sizes"]["224"]["issue_img_s"] >= 250e3


@pytest.mark.skipif(not _ptxas_available(), reason="triton's bundled ptxas is not available")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a real GPU runs this path in the gpu tests")
def test_launch_path_binds_and_compiles_both_kernels_for_sm90_without_a_gpu():
    # decode_triton's own launch path (a _Plan: argument binding, constexpr specialization with the jitted
    # helpers as constexprs, no specialization on the size arguments, the kernel cache, then the direct
    # launches of the compiled kernel) up to the launcher, as on an H100 - only the launch itself is left
    # out. Fresh JITFunctions, so nothing compiled for the stand-in driver is cached elsewhere.
    from triton.runtime import driver

    arch = Architecture(sine_layers=3, width=40)
    bank = TensorBank.from_params(siren.init_params(arch, 8, generator=torch.Generator().manual_seed(0)), arch)
    compact = bank.to_layout("compact")
    idx, theta = torch.arange(4), torch.zeros(4, 2, 3)
    decode_kernel = triton.jit(siren_decode._siren_decode_kernel, do_not_specialize=siren_decode.DECODE_RUNTIME_INTS,
                               do_not_specialize_on_alignment=siren_decode.DECODE_POINTERS)
    helpers = dict(SINE=triton.jit(siren_decode._sine), STAGE=triton.jit(siren_decode._stage_hidden_layer))
    expand_kernel = triton.jit(siren_decode._expand_hidden_kernel)
    launcher = StandInDriver.launcher_cls
    previous = driver._active  # None until first used; reset_active() would create a CUDA driver here and fail
    driver.set_active(StandInDriver())
    plans = []
    try:
        for by_batch in (False, True):
            config = kernel_config(40, 2, hidden_by_batch=by_batch)
            options = dict(num_warps=config.num_warps, maxnreg=config.maxnreg)
            plan = siren_decode._Plan(torch.device("cpu"), False, decode_kernel, dict(config.constexprs, **helpers),
                                      options, config.constexprs["BLOCK_P"])
            plans.append(plan)
            hidden = torch.empty(4, 2, 40, 40, dtype=torch.int8) if by_batch else bank.hidden_w
            launched = []
            for size in (16, 16, 17):  # the first launch binds and compiles, the next ones launch directly
                out = torch.empty(4, 3, size, size)
                args = (idx, theta, out, bank.first_w, bank.first_b, hidden, bank.hidden_scale, bank.hidden_b,
                        bank.last_w, bank.last_b, bank.num_images, size * size, size, 4, 1, 4, *out.stride()[:2],
                        1, 1 / size, 1 / size, 30.0, 30.0, float("nan"))
                plan._launch((4, 1, 1), args)
                assert plan.compiled is not None and "sin.approx.f32" in plan.compiled.asm["ptx"]
                launched.append([a for a in launcher.last_args  # tensors and per-launch metadata objects aside
                                 if not isinstance(a, torch.Tensor) and type(a).__name__ != "LazyDict"])
            # The direct launch passes the launcher what triton's own binding passed (grid, kernel handle,
            # scalars, constexprs), and another size needs no other binary.
            assert launched[0][:3] == [4, 1, 1] and len(launched[0]) == len(launched[1])
            assert all(a is b or a == b for a, b in zip(launched[0], launched[1]) if a == a), launched
            assert decode_kernel.warmup(*args, **config.constexprs, **helpers, grid=(4,), **options) is plan.compiled
        compiled = expand_kernel.warmup(idx, compact.hidden_masks, compact.hidden_offsets, compact.hidden_values,
                                        torch.empty(4, 2, 40, 40, dtype=torch.int8), 8,
                                        compact.hidden_masks.shape[1], TOTAL=compact.hidden_total, BLOCK=1024,
                                        INTERPRETED=False, ADD=None, grid=(4,), num_warps=4)
        assert compiled.asm["cubin"]
    finally:
        StandInDriver.forget(*(plan.compiled for plan in plans if plan.compiled is not None))
        driver.set_active(previous)


@pytest.mark.skipif(not _ptxas_available(), reason="triton's bundled ptxas is not available")
@pytest.mark.parametrize("capability", [80, 90])
def test_compact_bank_kernels_compile_for_gpu_without_one(capability):
    # The decode kernel reading a batch's expanded weights, and the expansion kernel itself.
    compiled = compile_for_target(40, 2, capability=capability, hidden_by_batch=True)
    assert compiled.asm["cubin"] and "mma" in compiled.asm["ptx"]
    for total, dtype in ((9 * 40 * 40, "int8"), (2 * 15 * 15, "float16")):
        expand = compile_expand_for_target(total, capability=capability, hidden_dtype=dtype)
        assert expand.asm["cubin"]


# -- on a GPU (tools/gpu_check.sh) -------------------------------------------------------------------
@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("sine_layers,width,hidden_dtype,w0,first_w0", [
    (10, 28, "int8", 30.0, 30.0), (10, 32, "int8", 25.0, 35.0), (10, 40, "int8", 30.0, 30.0),
    (3, 15, "int8", 30.0, 20.0), (4, 40, "float16", 30.0, 30.0), (3, 28, "float32", 30.0, 30.0),
    (1, 15, "int8", 30.0, 30.0)])
def test_cuda_kernel_matches_torch(sine_layers, width, hidden_dtype, w0, first_w0):
    # Poisoned banks on the GPU: every padding case, the last images of an exactly-sized bank, w0 != first_w0.
    bank = guarded_bank(sine_layers, width, 64, hidden_dtype, seed=1, w0=w0, first_w0=first_w0, device="cuda")
    idx = torch.cat([torch.randint(0, 64, (40,)), torch.arange(56, 64)]).cuda()
    theta = random_theta(48, seed=3).cuda()
    for size in ((32, 32), (61, 97)):
        for th in (None, theta):
            ref = decode_torch(bank, idx, size, th)
            got = decode_triton(bank, idx, size, th)
            err = max_err(got, ref)
            assert err <= TOL, f"{sine_layers}x{width} {hidden_dtype} {size}: {err}"
    assert decode_mod.default_backend(bank) == "triton"
    assert torch.equal(decode(bank, idx, (61, 97)), decode_triton(bank, idx, (61, 97)))


@cuda
@pytest.mark.gpu
def test_cuda_libdevice_sine_and_nan_propagation():
    bank = guarded_bank(3, 28, 16, "float16", device="cuda")
    fields = {name: getattr(bank, name).clone() for name in ("first_w", "first_b", "hidden_w", "hidden_scale",
                                                             "hidden_b", "last_w", "last_b")}
    fields["hidden_w"][1, 0, 2, 3] = float("nan")
    fields["last_b"][2, 0] = float("nan")
    poisoned = TensorBank(bank.arch, **fields)
    idx = torch.arange(16, device="cuda")
    ref = decode_torch(poisoned, idx, 24)
    for fast_sin in (True, False):
        got = decode_triton(poisoned, idx, 24, fast_sin=fast_sin)
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        finite = ~torch.isnan(ref)
        assert max_err(got[finite], ref[finite]) <= TOL
    bad = torch.tensor([0, 16, -1], device="cuda")  # device indices are not range-checked on the host
    got = decode_triton(bank, bad, 8)
    assert torch.isfinite(got[0]).all() and torch.isnan(got[1:]).all()


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("sine_layers,width,prune", [(10, 40, 0.255), (3, 15, 0.5)])
def test_cuda_compact_bank_matches_dense(sine_layers, width, prune):
    dense, compact = guarded_compact_bank(sine_layers, width, 300, "int8", prune, device="cuda")
    idx = torch.randint(0, 300, (96,), device="cuda")
    assert torch.equal(expand_hidden(compact, idx), dense.hidden_w[idx])
    theta = random_theta(96, seed=5).cuda()
    got = decode(compact, idx, 56, theta, backend="triton")
    ref = decode(dense, idx, 56, theta, backend="triton")
    assert torch.equal(got, ref)
    assert max_err(got, decode_torch(dense, idx, 56, theta)) <= TOL


@cuda
@pytest.mark.gpu
def test_cuda_channels_last_bf16_out_reuse_and_graph_capture():
    bank = guarded_bank(10, 28, 32, "int8", seed=4, device="cuda")
    idx = torch.arange(32, device="cuda")
    ref = decode_torch(bank, idx, 64)
    out = torch.empty(32, 3, 64, 64, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    got = decode(bank, idx, 64, out=out, dtype=torch.bfloat16)
    assert got is out
    assert max_err(got, ref) <= TOL + 4e-3
    # The documented capture: device-side indices and theta, a preallocated out, one warm-up call.
    theta = random_theta(32, seed=8).cuda()
    out = torch.empty(32, 3, 64, 64, device="cuda")
    decode_triton(bank, idx, 64, theta, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_triton(bank, idx, 64, theta, out=out)
    out.zero_()
    idx.copy_(torch.arange(31, -1, -1, device="cuda"))
    graph.replay()
    assert max_err(out, decode_torch(bank, idx, 64, theta)) <= TOL


@cuda
@pytest.mark.gpu
def test_cuda_largest_image_pixel_positions():
    # Near MAX_PIXELS the kernel's float row estimate needs its correction step; first_w0 = 300 makes a pixel
    # decoded at its neighbour's position differ from torch by far more than the tolerance.
    arch = Architecture(sine_layers=1, width=8, first_w0=300.0)
    bank = TensorBank.from_params(siren.init_params(arch, 1, generator=torch.Generator().manual_seed(0)), arch,
                                  device="cuda")
    size = (2993, 2801)
    assert size[0] * size[1] <= siren_decode.MAX_PIXELS
    idx = torch.zeros(1, dtype=torch.int64, device="cuda")
    assert max_err(decode_triton(bank, idx, size), decode_torch(bank, idx, size)) <= TOL


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
    assert max_err(got, ref) <= TOL
