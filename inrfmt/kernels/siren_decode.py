"""Fused SIREN decoder: one Triton launch decodes a batch of images from the TensorBank.

One program per (image, tile of BLOCK_P output pixels), on a 1-D grid. A program
  1. computes its pixels' (x, y) from (row, col) exactly as siren.pixel_grid does and applies the image's theta,
  2. runs every layer with the activations [BLOCK_P, units] kept in registers: the first layer as two FMAs
     per unit, each hidden layer as tl.dot of fp16 activations with the raw int8 (or fp16/fp32) weights
     read straight from the bank, then `acc * (scale * w0) + b * w0` in fp32 - the int8 values are exact in
     fp16, so dequantization and w0 cost nothing and add no rounding,
  3. applies the linear output layer (padded to 16 outputs for tl.dot), 0.5*o + 0.5, clamps, and stores into
     out [B,3,h,w] through its strides (so NCHW and channels_last both work) in out's dtype.
First/last layers and biases are upcast to fp32 as they are loaded (a bank of a --float-dtype float16 file
holds them in fp16). A compact bank's batch is first expanded by `expand_hidden` (one program per image:
bitmap bits -> prefix count -> gather of the kept values) and read by batch position (HIDDEN_BY_BATCH).

Width: tl.dot needs power-of-two dims >= 16, so the W units are held as one block of the next power of two
or, when narrower, two blocks (width 40 -> 32 + 16 instead of 64; see width_blocks). Every weight load is
masked with `row < WIDTH and col < WIDTH` and uses the true row stride WIDTH, so padded rows and columns
are never read. Image offsets are int64 (banks with N*H*W*W >= 2^31 elements), and an out-of-range image
index writes NaN instead of reading outside the bank.

Sine: FAST_SIN selects `sin.approx.f32` (inline PTX; GPU only), by default after a Cody-Waite range
reduction to [-pi, pi] (sin.approx loses accuracy for large arguments), else tl.sin (libdevice on GPU;
works in the interpreter).

The kernel object is created lazily by `triton.jit` at first use, so whether it runs compiled or in
triton's CPU interpreter is decided by TRITON_INTERPRET at that moment, not at import time.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..decode_args import parse_size, prepare_indices, prepare_out, prepare_theta
from ..device import triton_interpreted
from ..errors import InrUsageError

OUT_PAD = 16  # the 3 output channels padded for tl.dot
MIN_DOT = 16  # smallest tl.dot dimension


def _sine(z, FAST_SIN: tl.constexpr, RANGE_REDUCE: tl.constexpr):
    """sin(z) for the kernel: sin.approx.f32 (after a range reduction) or tl.sin, by constexpr."""
    if RANGE_REDUCE:
        # z - n*2pi, n = round(z / 2pi) by the 1.5*2^23 trick (FP32 adds, no conversion instructions);
        # 2pi split Cody-Waite style so that n*6.28125 is exact.
        n = (z * 0.15915494309189535 + 12582912.0) - 12582912.0
        z = (z - n * 6.28125) - n * 0.0019353071795864769
    if FAST_SIN:
        return tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=f,f", [z], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.sin(z)


def _siren_decode_kernel(
    idx_ptr, theta_ptr, out_ptr,
    first_w_ptr, first_b_ptr, hidden_w_ptr, hidden_scale_ptr, hidden_b_ptr, last_w_ptr, last_b_ptr,
    num_images, out_h, out_w, tiles_per_image,
    stride_ob, stride_oc, stride_oh, stride_ow,
    first_w0, w0, invalid_value,
    WIDTH: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, NUM_HIDDEN: tl.constexpr, OUT_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr, HAS_THETA: tl.constexpr, FAST_SIN: tl.constexpr, RANGE_REDUCE: tl.constexpr,
    FP16_DOT: tl.constexpr, HIDDEN_BY_BATCH: tl.constexpr, SINE: tl.constexpr,
):
    # Units are held in block A (units 0..WA-1) and, when WB > 0, block B (units WA..WA+WB-1); WB == 0
    # means one block of WA >= WIDTH units. SINE is `_sine` for the current mode, passed as a constexpr
    # (a jitted helper cannot be called from the interpreter, nor a plain function from compiled code).
    # HIDDEN_BY_BATCH: hidden_w_ptr is the batch's own [B,H,W,W] weights (expanded from a compact bank),
    # indexed by batch position instead of image index.
    pid = tl.program_id(0)
    b = pid // tiles_per_image
    tile = pid % tiles_per_image

    img = tl.load(idx_ptr + b).to(tl.int64)
    valid = (img >= 0) & (img < num_images)
    img = tl.where(valid, img, 0)

    # -- pixel coordinates (pixel centres, affine_grid align_corners=False) ------------------------
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < out_h * out_w
    row = p // out_w
    col = p % out_w
    x = (col * 2 + 1).to(tl.float32) / out_w - 1.0
    y = (row * 2 + 1).to(tl.float32) / out_h - 1.0
    if HAS_THETA:
        tb = theta_ptr + b.to(tl.int64) * 6
        t00 = tl.load(tb)
        t01 = tl.load(tb + 1)
        t02 = tl.load(tb + 2)
        t10 = tl.load(tb + 3)
        t11 = tl.load(tb + 4)
        t12 = tl.load(tb + 5)
        x, y = x * t00 + y * t01 + t02, x * t10 + y * t11 + t12

    ka = tl.arange(0, WA)
    ka_mask = ka < WIDTH
    fw = first_w_ptr + img * (WIDTH * 2)
    fb = first_b_ptr + img * WIDTH
    if HIDDEN_BY_BATCH:
        wimg = b.to(tl.int64)
    else:
        wimg = img

    # -- first sine layer: z = first_w0 * (W c + b) ------------------------------------------------
    za = (x[:, None] * (tl.load(fw + ka * 2, mask=ka_mask, other=0.0).to(tl.float32) * first_w0)[None, :]
          + y[:, None] * (tl.load(fw + ka * 2 + 1, mask=ka_mask, other=0.0).to(tl.float32) * first_w0)[None, :]
          + (tl.load(fb + ka, mask=ka_mask, other=0.0).to(tl.float32) * first_w0)[None, :])
    act_a = SINE(za, FAST_SIN, RANGE_REDUCE)
    if WB > 0:
        kb = WA + tl.arange(0, WB)
        kb_mask = kb < WIDTH
        zb = (x[:, None] * (tl.load(fw + kb * 2, mask=kb_mask, other=0.0).to(tl.float32) * first_w0)[None, :]
              + y[:, None] * (tl.load(fw + kb * 2 + 1, mask=kb_mask, other=0.0).to(tl.float32) * first_w0)[None, :]
              + (tl.load(fb + kb, mask=kb_mask, other=0.0).to(tl.float32) * first_w0)[None, :])
        act_b = SINE(zb, FAST_SIN, RANGE_REDUCE)

    # -- hidden sine layers: z = (scale*w0) * (q @ act) + w0 * b ------------------------------------
    # Weight tiles [out, in] at offset out*WIDTH + in: the row stride is the true width, never the padded
    # one, and rows/cols >= WIDTH are masked (never read).
    off_aa = ka[:, None] * WIDTH + ka[None, :]
    msk_aa = ka_mask[:, None] & ka_mask[None, :]
    if WB > 0:
        off_ab = ka[:, None] * WIDTH + kb[None, :]  # out in A, in in B
        msk_ab = ka_mask[:, None] & kb_mask[None, :]
        off_ba = kb[:, None] * WIDTH + ka[None, :]
        msk_ba = kb_mask[:, None] & ka_mask[None, :]
        off_bb = kb[:, None] * WIDTH + kb[None, :]
        msk_bb = kb_mask[:, None] & kb_mask[None, :]
    for layer in range(NUM_HIDDEN):
        lw = img * NUM_HIDDEN + layer
        wbase = hidden_w_ptr + (wimg * NUM_HIDDEN + layer) * (WIDTH * WIDTH)
        scale = tl.load(hidden_scale_ptr + lw) * w0
        hbase = hidden_b_ptr + lw * WIDTH
        q_aa = tl.load(wbase + off_aa, mask=msk_aa, other=0)
        if FP16_DOT:
            a16 = act_a.to(tl.float16)
            acc_a = tl.dot(a16, tl.trans(q_aa.to(tl.float16)))
        else:
            acc_a = tl.dot(act_a, tl.trans(q_aa.to(tl.float32)), input_precision="ieee")
        if WB > 0:
            q_ab = tl.load(wbase + off_ab, mask=msk_ab, other=0)
            q_ba = tl.load(wbase + off_ba, mask=msk_ba, other=0)
            q_bb = tl.load(wbase + off_bb, mask=msk_bb, other=0)
            if FP16_DOT:
                b16 = act_b.to(tl.float16)
                acc_a = tl.dot(b16, tl.trans(q_ab.to(tl.float16)), acc_a)
                acc_b = tl.dot(a16, tl.trans(q_ba.to(tl.float16)))
                acc_b = tl.dot(b16, tl.trans(q_bb.to(tl.float16)), acc_b)
            else:
                acc_a = tl.dot(act_b, tl.trans(q_ab.to(tl.float32)), acc_a, input_precision="ieee")
                acc_b = tl.dot(act_a, tl.trans(q_ba.to(tl.float32)), input_precision="ieee")
                acc_b = tl.dot(act_b, tl.trans(q_bb.to(tl.float32)), acc_b, input_precision="ieee")
        za = acc_a * scale + (tl.load(hbase + ka, mask=ka_mask, other=0.0).to(tl.float32) * w0)[None, :]
        act_a = SINE(za, FAST_SIN, RANGE_REDUCE)
        if WB > 0:
            zb = acc_b * scale + (tl.load(hbase + kb, mask=kb_mask, other=0.0).to(tl.float32) * w0)[None, :]
            act_b = SINE(zb, FAST_SIN, RANGE_REDUCE)

    # -- linear output layer, 3 channels padded to OUT_PAD -----------------------------------------
    c = tl.arange(0, OUT_PAD)
    cmask = c < 3
    lbase = last_w_ptr + img * (3 * WIDTH)
    lw_a = tl.load(lbase + c[:, None] * WIDTH + ka[None, :], mask=cmask[:, None] & ka_mask[None, :],
                   other=0.0).to(tl.float32)
    if FP16_DOT:
        o = tl.dot(act_a.to(tl.float16), tl.trans(lw_a.to(tl.float16)))
    else:
        o = tl.dot(act_a, tl.trans(lw_a), input_precision="ieee")
    if WB > 0:
        lw_b = tl.load(lbase + c[:, None] * WIDTH + kb[None, :], mask=cmask[:, None] & kb_mask[None, :],
                       other=0.0).to(tl.float32)
        if FP16_DOT:
            o = tl.dot(act_b.to(tl.float16), tl.trans(lw_b.to(tl.float16)), o)
        else:
            o = tl.dot(act_b, tl.trans(lw_b), o, input_precision="ieee")
    lb = tl.load(last_b_ptr + img * 3 + c, mask=cmask, other=0.0).to(tl.float32)
    pix = tl.minimum(tl.maximum((o + lb[None, :]) * 0.5 + 0.5, 0.0), 1.0)
    pix = tl.where(valid, pix, invalid_value)  # NaN (a runtime argument: no float("nan") in triton code)

    offs = (b.to(tl.int64) * stride_ob + c[None, :].to(tl.int64) * stride_oc
            + row[:, None].to(tl.int64) * stride_oh + col[:, None].to(tl.int64) * stride_ow)
    tl.store(out_ptr + offs, pix.to(out_ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])


def _add(a, b):
    return a + b


def _expand_hidden_kernel(idx_ptr, masks_ptr, offsets_ptr, values_ptr, out_ptr, num_images, mask_row_bytes,
                          TOTAL: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr, ADD: tl.constexpr):
    """out[b] = the dense [H*W*W] hidden weights of image idx[b] of a compact bank: bit i of the image's
    bitmap set -> the next of its kept values, else 0 (all zeros for an out-of-range index).
    INTERPRETED: scan and sum with ADD (`_add` jitted under TRITON_INTERPRET) instead of tl.cumsum/tl.sum, whose
    helpers were jitted when triton was imported and so cannot run in the interpreter if TRITON_INTERPRET was
    set later; compiled, ADD is unused (a combine function cannot be passed as a constexpr there)."""
    b = tl.program_id(0)
    img = tl.load(idx_ptr + b).to(tl.int64)
    valid = (img >= 0) & (img < num_images)
    img = tl.where(valid, img, 0)
    mask_row = masks_ptr + img * mask_row_bytes
    dst = out_ptr + b.to(tl.int64) * TOTAL
    taken = tl.load(offsets_ptr + img)  # int64: index of the next kept value in values_ptr
    for start in range(0, TOTAL, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        in_range = pos < TOTAL
        byte = tl.load(mask_row + (pos >> 3), mask=in_range, other=0).to(tl.int32)
        bit = (byte >> (7 - (pos & 7))) & 1  # numpy packbits order: most significant bit first
        bit = tl.where(valid, bit, 0)
        if INTERPRETED:
            inclusive = tl.associative_scan(bit, 0, ADD)
            count = tl.reduce(bit, 0, ADD)
        else:
            inclusive = tl.cumsum(bit, 0)
            count = tl.sum(bit, 0)
        rank = inclusive - bit  # kept values before this one within the block
        value = tl.load(values_ptr + (taken + rank), mask=bit != 0, other=0)
        tl.store(dst + pos, value, mask=in_range)
        taken += count


_KERNELS: dict[bool, tuple] = {}
_EXPAND_KERNELS: dict[bool, tuple] = {}


def _kernel(interpret: bool):
    """(kernel, sine helper) for the current mode; triton.jit reads TRITON_INTERPRET when it wraps. The
    interpreter runs the kernel as Python, so its helper is the plain function."""
    if interpret not in _KERNELS:
        _KERNELS[interpret] = (triton.jit(_siren_decode_kernel), _sine if interpret else triton.jit(_sine))
    return _KERNELS[interpret]


def _expand_kernel(interpret: bool):
    """(kernel, add helper) for the current mode, as _kernel."""
    if interpret not in _EXPAND_KERNELS:
        # Interpreted, the scan's combine function is jitted now, under TRITON_INTERPRET (the interpreter
        # calls it through .fn); compiled, the kernel uses tl.cumsum/tl.sum.
        _EXPAND_KERNELS[interpret] = (triton.jit(_expand_hidden_kernel), triton.jit(_add) if interpret else None)
    return _EXPAND_KERNELS[interpret]


EXPAND_BLOCK = 1024  # bitmap positions per step of the expansion kernel


def expand_hidden(bank, idx: torch.Tensor) -> torch.Tensor:
    """[B,H,W,W] hidden weights (storage dtype) of images `idx` (int64 on the bank's device) of a compact
    bank, in one launch of one program per image. Same result as bank.hidden_dense(idx)."""
    batch = idx.numel()
    out = torch.empty((batch, *bank.hidden_shape), dtype=bank.hidden_values.dtype, device=bank.device)
    if batch == 0:
        return out
    if bank.hidden_values.numel() == 0:  # everything pruned: nothing to read
        return out.zero_()
    total = bank.hidden_total
    kernel, add = _expand_kernel(triton_interpreted())
    args = (idx, bank.hidden_masks, bank.hidden_offsets, bank.hidden_values, out, bank.num_images,
            bank.hidden_masks.shape[1])
    meta = dict(TOTAL=total, BLOCK=min(EXPAND_BLOCK, triton.next_power_of_2(total)), INTERPRETED=add is not None,
                ADD=add)
    if bank.device.type == "cuda":
        with torch.cuda.device(bank.device):
            kernel[(batch,)](*args, **meta, num_warps=4)
    else:
        kernel[(batch,)](*args, **meta)
    return out


def padded_width(width: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(width))


def width_blocks(width: int, split: bool = True) -> tuple[int, int]:
    """(WA, WB): the width held as one power-of-two block (WB = 0), or as two (WA + WB units) when that
    is narrower than padding to the next power of two - 40 -> 32 + 16 = 48 instead of 64 (25% fewer sines
    and 44% fewer MACs per hidden layer)."""
    padded = padded_width(width)
    if not split or padded == width or width <= MIN_DOT:
        return padded, 0
    wa = padded // 2
    wb = max(MIN_DOT, triton.next_power_of_2(width - wa))
    return (wa, wb) if wa + wb < padded else (padded, 0)


def default_config(width: int, split: bool = True) -> tuple[int, int]:
    """(pixels per program, warps) by held width; 128-pixel tiles were the prototype's best at width 32."""
    held = sum(width_blocks(width, split))
    if held <= 32:
        return 128, 4
    if held <= 64:
        return 64, 4
    return 32, 4


def decode_triton(bank, indices, size, theta=None, *, out=None, dtype=torch.float32, fast_sin=None,
                  range_reduce=None, fp16_dot=True, split_width=True, block_pixels=None,
                  num_warps=None) -> torch.Tensor:
    """Fused-kernel decode; same arguments and result as decode.decode_torch.

    fast_sin: sin.approx.f32 (default on CUDA; not available in the interpreter). range_reduce: reduce sine
    arguments to [-pi, pi] first (default: with fast_sin). fp16_dot=False runs the matmuls in exact fp32
    ("ieee") for exactness checks. split_width=False pads the width to one power of two instead of two
    blocks (see width_blocks). block_pixels/num_warps override the tile config.
    """
    interpret = triton_interpreted()
    device = bank.device
    if device.type != "cuda" and not interpret:
        raise InrUsageError(f"the triton decoder needs a CUDA bank (this bank is on {device}); "
                            "set TRITON_INTERPRET=1 to run it in triton's CPU interpreter")
    if fast_sin is None:
        fast_sin = not interpret
    if fast_sin and interpret:
        raise InrUsageError("fast_sin (sin.approx.f32 inline PTX) cannot run in triton's interpreter")
    if range_reduce is None:
        range_reduce = fast_sin
    h, w = parse_size(size)
    idx = prepare_indices(bank, indices)
    batch = idx.numel()
    theta = prepare_theta(theta, batch, device)
    out = prepare_out(out, batch, h, w, dtype, device)
    if batch == 0:
        return out
    arch = bank.arch
    width = arch.width
    default_pixels, default_warps = default_config(width, split_width)
    block_pixels = block_pixels or default_pixels
    num_warps = num_warps or default_warps
    if block_pixels < MIN_DOT or block_pixels & (block_pixels - 1):
        raise InrUsageError(f"block_pixels must be a power of two >= {MIN_DOT}, got {block_pixels}")
    tiles = triton.cdiv(h * w, block_pixels)
    grid = (batch * tiles,)
    if grid[0] >= 2 ** 31:
        raise InrUsageError(f"batch {batch} at {h}x{w} needs {grid[0]} programs; decode fewer images at once")
    hidden = bank.hidden_w
    by_batch = hidden is None
    if by_batch:  # compact bank: this batch's weights, expanded once (a [B,H,W,W] temporary)
        hidden = expand_hidden(bank, idx)
    args = (
        idx, theta if theta is not None else idx, out,
        bank.first_w, bank.first_b, hidden, bank.hidden_scale, bank.hidden_b, bank.last_w, bank.last_b,
        bank.num_images, h, w, tiles,
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        float(arch.first_w0), float(arch.w0), float("nan"),
    )
    meta = _constexprs(width, arch.hidden_layers, block_pixels, theta is not None, fast_sin, range_reduce, fp16_dot,
                       split_width, by_batch)
    kernel, sine = _kernel(interpret)
    meta["SINE"] = sine
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **meta, num_warps=num_warps)
    else:
        kernel[grid](*args, **meta)
    return out


def _constexprs(width, hidden_layers, block_pixels, has_theta, fast_sin, range_reduce, fp16_dot, split,
                hidden_by_batch) -> dict:
    wa, wb = width_blocks(width, split)
    return dict(WIDTH=int(width), WA=wa, WB=wb, NUM_HIDDEN=int(hidden_layers), OUT_PAD=OUT_PAD,
                BLOCK_P=int(block_pixels), HAS_THETA=bool(has_theta), FAST_SIN=bool(fast_sin),
                RANGE_REDUCE=bool(range_reduce), FP16_DOT=bool(fp16_dot), HIDDEN_BY_BATCH=bool(hidden_by_batch))
