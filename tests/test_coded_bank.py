"""The coded TensorBank (format 2): packed codes on the device, unpacked and dequantized per batch.

Every comparison against the parameters is exact (grid.values is the one dequantization); the triton
kernels run in triton's interpreter on tiny inputs (see tests/test_kernel.py), and compile ahead of time
for sm_80/sm_90 without a GPU.
"""
import os
import pickle
import sys

import numpy as np
import pytest
import torch

import inrfmt
from inrfmt import bank as bank_module
from inrfmt import siren
from inrfmt.bank import TensorBank, coded_layout, lane_width, layout_bytes
from inrfmt.decode import decode, decode_torch
from inrfmt.errors import InrFormatError, InrUsageError
from inrfmt.grid import CodeGrid
from inrfmt.prior import Prior
from inrfmt.reader import InrFile
from inrfmt.spec import Architecture, flatten_params, param_groups, unflatten_params
from inrfmt.writer import InrWriter

TOL = 5e-4  # tests/test_kernel.py's tolerances: the fp16 path and the fp32 ("ieee") path against torch
EXACT_TOL = 1e-5
CLASS_BITS = {"first_w": 8, "first_b": 8, "hidden_w": 4, "hidden_b": 8, "last_w": 8, "last_b": 8}
RANGES = {"first_w": 0.6, "hidden_w": 0.08, "last_w": 0.4, "last_b": 0.4}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_grid(arch, **bits):
    return CodeGrid.from_widths(arch, bits={**CLASS_BITS, **bits}, ranges=RANGES)


def make_codes(arch, grid, n, seed=0, prior=True):
    """(codes int16 [n, P], theta0 float32 [P] or None) from SIREN-initialised nets around a random prior."""
    params = siren.init_params(arch, n, generator=torch.Generator().manual_seed(seed))
    theta0 = torch.randn(arch.params_per_image, generator=torch.Generator().manual_seed(seed + 1)) * 0.02 \
        if prior else None
    return grid.codes(flatten_params(params, arch), theta0), theta0


def reference_rows(codes: np.ndarray, grid) -> np.ndarray:
    """The packed rows written down from the layout's definition, one lane at a time (slow, tiny inputs)."""
    groups = param_groups(grid.arch)
    starts, at = [], 0
    for g, b in zip(groups, grid.bits):
        starts.append(at)
        at += -(-g.size * lane_width(int(b)) // 32)
    rows = np.zeros((len(codes), at), np.uint64)
    for n, image in enumerate(codes):
        for g, b, start in zip(groups, grid.bits, starts):
            pw = lane_width(int(b))
            for i in range(g.size):
                u = int(image[g.offset + i]) + (1 << (int(b) - 1))
                assert 0 <= u < 1 << int(b)
                rows[n, start + i * pw // 32] |= np.uint64(u << (i * pw % 32))
    return rows.astype(np.uint32).view(np.int32)


# -- layout and packing ---------------------------------------------------------------------------------
def test_packed_rows_follow_the_layout_bit_for_bit(monkeypatch):
    # Every lane width (1..3 and 4 bits -> 4-bit lanes, 5..8 -> 8, 9..16 -> 16), odd group sizes (last_b: 3
    # codes), and codes at both ends of each range.
    arch = Architecture(sine_layers=3, width=5)
    grid = CodeGrid.from_widths(arch, bits={"first_w": 3, "first_b": 6, "hidden_w": 4, "hidden_b": 9,
                                            "last_w": 16, "last_b": 1}, ranges=RANGES)
    layout = coded_layout(grid)
    assert layout.lane_widths.tolist() == [4, 8, 4, 16, 4, 16, 16, 4]
    # words: first_w 10 x 4 bits -> 2, first_b 5 x 8 -> 2, hidden_w 25 x 4 -> 4, hidden_b 5 x 16 -> 3, ...
    assert layout.word_offsets.tolist() == [0, 2, 4, 8, 11, 15, 18, 26]
    assert layout.words_per_image == 27
    rng = np.random.default_rng(0)
    half = layout.half
    codes = (rng.integers(0, 1 << 20, (4, arch.params_per_image)) % (2 * half) - half).astype(np.int16)
    codes[0], codes[1] = -half, half - 1
    bank = TensorBank.from_codes(arch, grid, codes)
    assert bank.codes.dtype == torch.int32 and bank.codes.shape == (4, 27)
    np.testing.assert_array_equal(bank.codes.numpy(), reference_rows(codes, grid))
    assert bank.code_offsets.tolist() == layout.word_offsets.tolist()
    assert bank.code_widths.tolist() == layout.lane_widths.tolist()
    idx = torch.tensor([3, 0, 1, 3])
    assert torch.equal(bank.unpacked_codes(idx), torch.from_numpy(codes[[3, 0, 1, 3]]).int())
    # The whole-batch gather path (CUDA, big-endian hosts) unpacks the same codes.
    monkeypatch.setattr(bank_module.sys, "byteorder", "big")
    assert torch.equal(bank.unpacked_codes(idx), torch.from_numpy(codes[[3, 0, 1, 3]]).int())
    monkeypatch.setattr(bank_module.sys, "byteorder", sys.byteorder)
    # numpy or torch codes, any integer dtype: the same bank.
    again = TensorBank.from_codes(arch, grid, torch.from_numpy(codes.astype(np.int64)))
    assert torch.equal(again.codes, bank.codes) and torch.equal(again.theta0, torch.zeros(arch.params_per_image))


def test_params_and_decode_torch_are_grid_values_exactly():
    # Wrapped sine biases, a prior, 16-bit last layer: params() is unflatten(grid.values(codes, theta0)) to
    # the bit, and decode_torch is siren.forward on those values.
    arch = Architecture(sine_layers=4, width=9, w0=25.0, first_w0=35.0)
    grid = make_grid(arch, last_w=12, first_b=5)
    codes, theta0 = make_codes(arch, grid, 7)
    bank = TensorBank.from_codes(arch, grid, codes, theta0, labels=np.arange(7), heights=[5] * 7, widths=[6] * 7)
    assert bank.layout == "coded" and bank.num_images == len(bank) == 7 and bank.float_dtype == "float32"
    assert bank.hidden_dtype == "coded" and bank.labels.tolist() == list(range(7))
    idx = torch.tensor([6, 0, 2, 6])
    values = grid.values(codes[idx], theta0)
    assert torch.equal(bank.values(idx), values)
    expected = unflatten_params(values, arch)
    got = bank.params(idx)
    for name in expected:
        assert torch.equal(getattr(got, name), expected[name]), name
    theta = torch.tensor([[[0.9, 0.1, 0.05], [-0.1, 1.1, 0.0]]]).expand(4, 2, 3).contiguous()
    raw = siren.forward(siren.SirenParams(**expected), siren.transform_coords(siren.pixel_grid(5, 6), theta), arch)
    want = siren.to_pixels(raw).transpose(1, 2).reshape(4, 3, 5, 6)
    assert torch.equal(decode_torch(bank, idx, (5, 6), theta), want)
    assert torch.equal(decode(bank, idx, (5, 6), theta), want)  # the CPU default backend
    # Without a prior theta0 is zeros (and not added: the same values).
    plain = TensorBank.from_codes(arch, grid, codes)
    assert torch.equal(plain.theta0, torch.zeros(arch.params_per_image))
    zeros = grid.values(codes[idx], torch.zeros(arch.params_per_image))
    assert torch.equal(plain.values(idx), zeros) and torch.equal(zeros, grid.values(codes[idx]))
    assert not torch.signbit(plain.values(idx)[zeros == 0]).any()  # no -0.0 either
    # in_place: the same bits, written over the float32 codes given; other dtypes are refused.
    q = codes[idx].to(torch.float32)
    assert grid.values(q, theta0, in_place=True) is q and torch.equal(q, values)
    with pytest.raises(ValueError, match="float32"):
        grid.values(codes[idx], theta0, in_place=True)
    # unflatten_params of a tensor: views of it, the hidden layers included (no copy per decoded batch).
    assert all(t.untyped_storage().data_ptr() == values.untyped_storage().data_ptr() for t in expected.values())


def test_dense_conversion_and_device_moves_keep_the_values():
    arch = Architecture(sine_layers=3, width=7)
    grid = make_grid(arch)
    codes, theta0 = make_codes(arch, grid, 5)
    bank = TensorBank.from_codes(arch, grid, codes.numpy(), theta0.numpy(), labels=[4, 3, 2, 1, 0])
    dense = bank.to_layout("dense")
    assert dense.layout == "dense" and dense.hidden_w.dtype == torch.float32
    assert torch.equal(dense.hidden_scale, torch.ones(5, 2)) and torch.equal(dense.labels, bank.labels)
    idx = torch.arange(5)
    for name, value in bank.params(idx)._asdict().items():
        assert torch.equal(getattr(dense.params(idx), name), value), name
    assert torch.equal(decode_torch(dense, idx, 6), decode_torch(bank, idx, 6))
    assert bank.to_layout("compact").layout == "compact" and bank.to_layout("coded") is bank
    moved = bank.to("cpu")
    assert moved.layout == "coded" and moved.grid == grid and torch.equal(moved.codes, bank.codes)
    assert torch.equal(moved.theta0, bank.theta0) and moved.nbytes == bank.nbytes


def test_usage_errors_are_one_line():
    arch = Architecture(sine_layers=3, width=6)
    grid = make_grid(arch)
    codes, theta0 = make_codes(arch, grid, 3)
    bank = TensorBank.from_codes(arch, grid, codes, theta0)
    bad = codes.clone()
    bad[1, param_groups(arch)[2].offset + 5] = 8  # hidden_w.0 holds 4-bit codes: [-8, 7]
    cases = [
        (lambda: TensorBank.from_codes(arch, grid, bad), r"group hidden_w\.0 is outside its 4-bit range \[-8, 7\]"),
        (lambda: TensorBank.from_codes(arch, grid, codes[:, :-1]), "codes must be integers of shape"),
        (lambda: TensorBank.from_codes(arch, grid, codes.float()), "codes must be integers of shape"),
        (lambda: TensorBank.from_codes(Architecture(3, 7), grid, codes), "grid must be a CodeGrid"),
        (lambda: TensorBank.from_codes(arch, grid, codes, theta0[:-1]), "theta0 must be float"),
        (lambda: TensorBank(arch, codes=bank.codes[:, 1:].contiguous(), grid=grid), "codes must be torch.int32"),
        (lambda: TensorBank(arch, codes=bank.codes, grid=grid, first_w=torch.zeros(3, 6, 2)), "takes no first_w"),
        (lambda: TensorBank(arch, codes=bank.codes, grid=None), "grid must be a CodeGrid"),
        (lambda: TensorBank(arch, theta0=bank.theta0), "theta0 belongs to a coded bank"),
        (lambda: bank.hidden_dense(torch.arange(2)), "use bank.params"),
        (lambda: bank.to_layout("dense").to_layout("coded"), "cannot become 'coded'"),
        (lambda: bank.to_layout("dense").unpacked_codes(torch.arange(2)), "needs a coded bank"),
    ]
    for call, message in cases:
        with pytest.raises(InrUsageError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


# -- bytes ----------------------------------------------------------------------------------------------
def test_bank_bytes_by_arithmetic_and_against_the_file(tmp_path):
    # 3x16, hidden_w at 4 bits, everything else at 8: per image 32 + 16 + 128 + 16 + 128 + 16 + 48 + 3 bytes of
    # lanes = 97 words with last_b's word boundary, plus label (8), height (4) and width (4).
    arch = Architecture(sine_layers=3, width=16)
    grid = make_grid(arch)
    assert coded_layout(grid).words_per_image == 97
    n, p = 600, arch.params_per_image
    # Codes spread like a trained net's over its grid: roughly normal, 3 sigma at the edges of the range.
    rng = np.random.default_rng(0)
    half = coded_layout(grid).half
    codes = np.clip(np.round(rng.normal(0, half / 3, (n, p))), -half, half - 1).astype(np.int16)
    bank = TensorBank.from_codes(arch, grid, codes)
    g = len(param_groups(arch))
    assert bank.nbytes == n * (4 * 97 + 8 + 4 + 4) + 4 * p + 4 * g + 4 * g + 8 * p + 3 * 4 * p
    path = tmp_path / "coded.inr"
    with InrWriter(path, arch, grid=grid, chunk_images=256) as writer:
        writer.add_codes(codes, np.zeros(n, int), np.full(n, 32), np.full(n, 32), np.full(n, 30.0))
    with InrFile(path) as f:
        loaded = TensorBank.from_file(f, "cpu")
        assert layout_bytes(f)["coded"] == loaded.nbytes == bank.nbytes
        ratio = (loaded.nbytes / n) / (f.file_bytes / n)
    assert ratio <= 1.5, f"bank {loaded.nbytes / n:.0f} B/image vs file {f.file_bytes / n:.0f} B/image"


# -- loading a format 2 file ------------------------------------------------------------------------------
def write_coded(path, arch, grid, n, *, prior=True, chunk_images=4, seed=0):
    params = siren.init_params(arch, n, generator=torch.Generator().manual_seed(seed))
    prior_obj = None
    theta0 = None
    if prior:
        one = siren.init_params(arch, 1, generator=torch.Generator().manual_seed(seed + 7))
        prior_obj = Prior(arch, theta0={name: getattr(one, name)[0].numpy() for name in one._fields})
        theta0 = flatten_params(one, arch)[0]
    codes = grid.codes(flatten_params(params, arch), theta0).numpy()
    rng = np.random.default_rng(seed)
    labels, heights, widths = rng.integers(0, 3, n), rng.integers(4, 12, n), rng.integers(4, 12, n)
    with InrWriter(path, arch, grid=grid, prior=prior_obj, classes=["a", "b", "c"],
                   chunk_images=chunk_images) as writer:
        writer.add_codes(codes, labels, heights, widths, np.full(n, 30.0))
    return codes, labels, heights, widths


def test_from_file_equals_from_codes(tmp_path):
    arch = Architecture(sine_layers=3, width=11)
    grid = make_grid(arch, hidden_b=5)
    path = tmp_path / "d.inr"
    codes, labels, heights, widths = write_coded(path, arch, grid, 11)
    with InrFile(path) as f:
        assert f.coded and f.num_chunks == 3
        calls = []
        bank = TensorBank.from_file(f, "cpu", workers=2, progress=lambda done, total: calls.append((done, total)))
        theta0 = torch.from_numpy(f.theta0())
    assert calls == [(4, 11), (8, 11), (11, 11)]
    assert bank.layout == "coded" and bank.load_seconds > 0 and bank.grid == grid
    assert theta0.abs().sum() > 0 and torch.equal(bank.theta0, theta0)
    direct = TensorBank.from_codes(arch, grid, codes, theta0)
    assert torch.equal(bank.codes, direct.codes)
    assert bank.labels.tolist() == labels.tolist() and bank.heights.tolist() == heights.tolist()
    assert bank.widths.tolist() == widths.tolist()
    assert bank.labels.dtype == torch.int64 and bank.heights.dtype == torch.int32
    # layout="dense": the same values as a float32 dense bank; "compact" and "coded" on a format 1 file refused.
    dense = TensorBank.from_file(path, "cpu", layout="dense")
    idx = torch.arange(11)
    assert torch.equal(dense.hidden_w, bank.params(idx).hidden_w)
    with InrFile(path) as f:
        assert dense.nbytes == layout_bytes(f)["dense"]
    with pytest.raises(InrUsageError, match="no pruning masks"):
        TensorBank.from_file(path, "cpu", layout="compact")
    # A damaged chunk (its CRC no longer matches) fails the load with the reader's error, from a worker.
    with InrFile(path) as f:
        at = f.sections["blobs"]["offset"] + int(f.chunks[1]["offset"]) + 3
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    damaged = tmp_path / "damaged.inr"
    damaged.write_bytes(bytes(data))
    with pytest.raises(InrFormatError, match=r"chunks\[1\]"):
        TensorBank.from_file(damaged, "cpu", workers=2)
    from tests.inrfiles import write_random_inr

    old = write_random_inr(tmp_path / "v1.inr", [(8, 8)] * 3)
    with pytest.raises(InrUsageError, match="needs a format 2 file"):
        TensorBank.from_file(old, "cpu", layout="coded")


def test_dataset_and_loader_on_a_coded_file(tmp_path):
    arch = Architecture(sine_layers=2, width=8)
    grid = make_grid(arch)
    path = tmp_path / "d.inr"
    write_coded(path, arch, grid, 9, chunk_images=5)
    with inrfmt.open(path, device="cpu") as ds:
        assert ds.bank.layout == "coded" and ds.stats()["bank_layout"] == "coded"
        image, _ = ds[4]
        h, w = ds.sizes[4]
        assert torch.equal(image, decode_torch(ds.bank, [4], (int(h), int(w)))[0])
        batches = list(ds.loader(4, size=6, shuffle=True, seed=1))
        assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 6, 6), (4, 3, 6, 6), (1, 3, 6, 6)]
        seen = torch.cat([y for _, y in batches])
        assert sorted(seen.tolist()) == sorted(ds.bank.labels.tolist())
        copy = pickle.loads(pickle.dumps(ds))  # a worker's copy rebuilds the coded bank
        assert copy.bank.layout == "coded" and torch.equal(copy[4][0], image)
        copy.close()


# -- the triton path ------------------------------------------------------------------------------------
@pytest.fixture
def interpret(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("sine_layers,width,bits", [
    (3, 15, {}),                                    # 15 -> 16 units: the bias dot
    (2, 28, {"hidden_w": 3, "last_w": 12, "first_b": 5}),  # 28 -> 32: constant-one units; 4- and 16-bit lanes
    (1, 9, {}),                                     # no hidden layer
])
def test_interpreted_coded_decode_matches_torch(interpret, sine_layers, width, bits):
    from inrfmt.kernels.siren_decode import decode_triton, dequantize_codes

    arch = Architecture(sine_layers=sine_layers, width=width, w0=30.0, first_w0=20.0)
    grid = make_grid(arch, **bits)
    codes, theta0 = make_codes(arch, grid, 5, seed=width)
    bank = TensorBank.from_codes(arch, grid, codes, theta0)
    idx = torch.tensor([4, 0, 2, 4])  # the last image, twice
    scratch = dequantize_codes(bank, idx)
    params = bank.params(idx)
    for name, value in params._asdict().items():  # bit-identical to grid.values
        assert torch.equal(scratch[name], value) and scratch[name].is_contiguous(), name
    assert torch.equal(scratch["hidden_scale"], torch.ones(4, sine_layers - 1))
    theta = torch.tensor([[[1.1, 0.1, 0.2], [0.0, -0.9, 0.1]]]).expand(4, 2, 3).contiguous()
    ref = decode_torch(bank, idx, (6, 9), theta)
    assert (decode(bank, idx, (6, 9), theta, backend="triton") - ref).abs().max() <= TOL
    exact = decode_triton(bank, idx, (6, 9), theta, fp16_dot=False, block_pixels=16, tiles_per_program=2)
    assert (exact - ref).abs().max() <= EXACT_TOL
    # An out-of-range device index: NaN parameters, so a NaN image (as with the other layouts).
    bad = dequantize_codes(bank, torch.tensor([5, -1, 1]))
    assert all(torch.isnan(bad[name][:2]).all() for name in params._fields)
    assert torch.equal(bad["first_w"][2], bank.params(torch.tensor([1])).first_w[0])


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:
        return False


DEQUANT_SIGNATURE = {"idx_ptr": "*i64", "codes_ptr": "*i32", "word_ptr": "*i64", "unpack_ptr": "*i32",
                     "step_ptr": "*fp32", "theta0_ptr": "*fp32", "dest_ptr": "*i32", "out_ptr": "*fp32",
                     "num_images": "i32", "words_per_image": "i32", "num_params": "i32", "batch": "i32",
                     "invalid_value": "fp32"}


@pytest.mark.parametrize("capability", [80, 90])
def test_dequant_kernel_compiles_for_gpu_without_fma(capability):
    # With the plan's options (no FP contraction) the GPU computes float32(step * q) + theta0 in two
    # rounded steps, as grid.values does; with contraction it would be one fma.
    triton = pytest.importorskip("triton")
    if not _ptxas_available():
        pytest.skip("triton's bundled ptxas is not available")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from inrfmt.kernels import siren_decode

    plan = siren_decode._dequant_plan(("test-only",), torch.device("cpu"), False, 1024)
    siren_decode._PLANS.pop(("test-only",))
    source = ASTSource(triton.jit(siren_decode._dequant_codes_kernel), dict(DEQUANT_SIGNATURE, BLOCK="constexpr"),
                       constexprs=plan.constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=plan.options)
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"] and "mul.rn.f32" in ptx and "add.rn.f32" in ptx and "fma.rn.f32" not in ptx


def test_dequant_launch_path_is_not_specialized_on_its_sizes():
    # The dequant plan's own launch path on a stand-in sm_90 driver (tests/test_kernel.py's approach): the
    # first launch binds and compiles, later ones relaunch that binary directly whatever the image count
    # and batch. That is only right if triton's own binding picks the same binary for those values (1 and
    # multiples of 16 included, which it would otherwise specialize on): warmup() must return it.
    triton = pytest.importorskip("triton")
    if not _ptxas_available():
        pytest.skip("triton's bundled ptxas is not available")
    if torch.cuda.is_available():
        pytest.skip("a real GPU runs this path in the gpu tests")
    from triton.runtime import driver

    from inrfmt.kernels import siren_decode
    from tools.kernel_compile import StandInDriver

    kernel = triton.jit(siren_decode._dequant_codes_kernel, do_not_specialize=siren_decode.DEQUANT_RUNTIME_INTS,
                        do_not_specialize_on_alignment=siren_decode.DEQUANT_POINTERS)
    plan = siren_decode._Plan(torch.device("cpu"), False, kernel, {"BLOCK": 64},
                              {"num_warps": 4, "enable_fp_fusion": False})
    arch = Architecture(sine_layers=2, width=5)
    grid = make_grid(arch)
    previous = driver._active
    driver.set_active(StandInDriver())
    try:
        for n, batch in ((16, 16), (1, 1), (7, 3)):
            bank = TensorBank.from_codes(arch, grid, make_codes(arch, grid, n)[0])
            idx = torch.zeros(batch, dtype=torch.int64)
            out = torch.empty(batch * (arch.params_per_image + 1))
            args = (idx, bank.codes, bank.code_word, bank.code_unpack, grid.per_param("cpu")[0], bank.theta0,
                    siren_decode._scratch_destinations(arch, torch.device("cpu")), out, n, bank.codes.shape[1],
                    arch.params_per_image, batch, float("nan"))
            plan._launch((batch, 1, 1), args)
            assert plan.compiled is not None
            assert kernel.warmup(*args, BLOCK=64, grid=(batch,), **plan.options) is plan.compiled
        assert "fma.rn.f32" not in plan.compiled.asm["ptx"]
        real = siren_decode._jitted(False).dequant  # what decode_triton's plans launch: the same rules
        assert set(real.do_not_specialize) == set(siren_decode.DEQUANT_RUNTIME_INTS)
        assert set(real.do_not_specialize_on_alignment) == set(siren_decode.DEQUANT_POINTERS)
    finally:
        StandInDriver.forget(plan.compiled)
        driver.set_active(previous)


# -- on a GPU (tools/gpu_check.sh) -------------------------------------------------------------------------
@cuda
@pytest.mark.gpu
def test_cuda_coded_bank_load_and_decode(tmp_path):
    # The pinned-staging load, the gather unpacking and the dequant kernel on CUDA; 10x28 (the existing
    # tests' kernel configuration for a float32 bank is the one the coded path decodes with).
    arch = Architecture(sine_layers=10, width=28)
    grid = make_grid(arch)
    path = tmp_path / "d.inr"
    write_coded(path, arch, grid, 70, chunk_images=16)
    cpu = TensorBank.from_file(path, "cpu")
    gpu = TensorBank.from_file(path, "cuda")
    assert torch.equal(gpu.codes.cpu(), cpu.codes) and torch.equal(gpu.theta0.cpu(), cpu.theta0)
    idx = torch.cat([torch.arange(60, 70), torch.randint(0, 70, (30,))]).cuda()
    assert torch.equal(gpu.values(idx).cpu(), cpu.values(idx.cpu()))
    from inrfmt.kernels.siren_decode import dequantize_codes

    scratch = dequantize_codes(gpu, idx)
    for name, value in gpu.params(idx)._asdict().items():
        assert torch.equal(scratch[name], value), name
    theta = torch.tensor([[[1.0, 0.1, 0.0], [0.0, 0.9, 0.1]]]).expand(40, 2, 3).contiguous().cuda()
    ref = decode_torch(gpu, idx, 32, theta)
    assert (decode(gpu, idx, 32, theta) - ref).abs().max().item() <= TOL
