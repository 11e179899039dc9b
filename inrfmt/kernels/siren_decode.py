"""Fused SIREN decoder: one Triton launch decodes a batch of images from the TensorBank.

Grid: one program per (batch entry, group of pixel tiles). Program `pid` decodes batch entry
b = pid // groups_per_image, tiles [g * tiles_per_program, (g + 1) * tiles_per_program) of its image, each
tile BLOCK_P consecutive pixels in raster order. A program

  1. stages its image's weights once: the first layer's (x, y) weights as fp32 vectors, each hidden layer as
     one [WP, WP] tile for tl.dot (`_stage_hidden_layer`: dequantized, w0 folded in, in the dot's input
     dtype), the output layer as a [WP, 16] tile (0.5 folded in). The staged tiles are loop-invariant
     values, which the compiler keeps in shared memory (wgmma's operand B on sm_90; ldmatrix on sm_80), so
     the per-tile layer loop loads no weights and has no barrier;
  2. per tile: computes the pixels' (x, y) as siren.pixel_grid does (to fp32 rounding), applies theta, runs
     the first layer as two fp32 FMAs per unit, every hidden layer as one tl.dot of fp16 activations with the
     staged tile (fp32 accumulation) followed by a sine, the output layer as a tl.dot, 0.5 * o + 0.5 (folded),
     a NaN-propagating clamp, and stores into out [B,3,h,w] (contiguous or channels_last) in out's dtype.

Precision: activations enter the dots as fp16 (accumulation in fp32). SPLIT adds each hidden weight's fp16
low part as a second dot with the same activations, so the staged weights are exact to ~2^-22; it is on
where those tiles fit MAX_STAGED_BYTES too (all presets but 10x40). The fp16 activations then dominate: max
abs error against the fp32 torch path below 1e-4 on random SIREN-initialised nets, up to about 1e-3 on
trained ones (BENCHMARKS.md; the triton interpreter runs the same fp16 arithmetic, so the CPU tests
measure it). Staged weights are w0 * w in fp16: a net whose |w0 * w| exceeds 65504 decodes to inf/NaN
(SIREN weights are far smaller). fp16_dot=False keeps everything in fp32 (exact to ~1e-6).

Units: the width W is held as WP = next power of two >= 16 units (tl.dot's shapes). Padded units have zero
weights and bias, so they stay at sin(0) = 0. When WP - W >= 2, units W and W+1 are constant ones (their
pre-activation is pi/2 from a fixed weight on themselves): the staged tiles carry each layer's bias, split
into a float16 high and low part, in the rows those units feed, so the bias costs nothing per element.
Otherwise (W = 15, 16, 31, 32, ...) the bias is a second tl.dot of a constant [BLOCK_P, 16] ones operand
with a [16, WP] tile holding the high and low parts. Units past the last multiple of 8 that holds a live
unit are masked to 0 after the sine, which lets the compiler drop their sines: tensor-core accumulators hold
columns in groups of 8 per register, so such a mask is known per register at compile time.

Sine: FAST_SIN selects `sin.approx.f32` (inline PTX; GPU only), else tl.sin (libdevice on GPU; works in the
interpreter). RANGE_REDUCE first reduces the argument to [-pi, pi] (Cody-Waite, 4 instructions per element):
sin.approx's error grows with |z| (its argument is rounded to fp32 in revolutions, about |z| * 6e-8 rad),
which stays far below the decoder's tolerance for the arguments SIRENs produce (see decode_triton).

NaN propagation matches the torch reference (a NaN weight or theta gives NaN pixels where torch gives them),
the clamp included. An out-of-range image index (possible only for device-side indices, which are not
range-checked on the host) decodes to NaN.

A coded bank (format 2: every parameter a packed low-bit code, inrfmt.bank) is decoded in two launches:
`_dequant_codes_kernel` unpacks the batch's codes straight from the bank and writes their float32 values
theta0 + step * q into a per-batch scratch laid out as a dense float32 bank of the batch (hidden_scale 1;
compiled without FMA contraction, so the values are bit-identical to grid.values), then the decode kernel
runs on that scratch unchanged, indexed by batch position (so it shares the float32 bank's compiled kernel
and its MACs per pixel).

Nets too large to stage (more than MAX_STAGED_LAYERS hidden layers, or more than MAX_STAGED_BYTES of staged
weights) run the same kernel with STAGED=False: a dynamic layer loop that stages each layer per tile.
Widths above MAX_PADDED_WIDTH are not supported (decode_triton raises; the default backend is then torch).

The kernel objects are created lazily by `triton.jit` at first use, so whether they run compiled or in
triton's CPU interpreter is decided by TRITON_INTERPRET at that moment, not at import time. The jitted
helpers reach the kernel as constexpr arguments (SINE, STAGE) for the same reason.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..decode_args import parse_size, pixel_stride, prepare_indices, prepare_out, prepare_theta
from ..device import triton_interpreted
from ..errors import InrUsageError
from ..spec import PARAM_CLASSES, param_groups

MIN_DOT = 16  # smallest tl.dot dimension
MMA_COLUMNS = 8  # tensor-core accumulator columns per register group (sm_80 mma.sync and sm_90 wgmma)
ONE_UNITS = 2  # constant-one units carrying the bias (high and low float16 parts)
MAX_PADDED_WIDTH = 128  # widest held width the kernel supports
MAX_STAGED_LAYERS = 16  # hidden layers unrolled with staged weights; deeper nets stream their weights
MAX_STAGED_BYTES = 96 * 1024  # staged hidden-layer tiles per program; larger nets stream their weights
MAX_PIXELS = 1 << 23  # output pixels per image: the kernel's float pixel arithmetic is exact below this
EXPAND_BLOCK = 1024  # bitmap positions per step of the expansion kernel


def _sine(z, FAST_SIN: tl.constexpr, RANGE_REDUCE: tl.constexpr):
    """sin(z) for the kernel: sin.approx.f32 or tl.sin by constexpr, after a range reduction if asked."""
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


def _stage_hidden_layer(hidden_w_ptr, hidden_scale_ptr, hidden_b_ptr, wimg, img, layer, w0,
                        WIDTH: tl.constexpr, WP: tl.constexpr, NUM_HIDDEN: tl.constexpr, ONES: tl.constexpr,
                        DOT_F16: tl.constexpr):
    """Dequantize hidden layer `layer` of one image into the tiles the layer loop multiplies with.

    Returns (w, w_low, bias): w [WP (in), WP (out)] = w0 * dequant(hidden_w)^T in the dot's input dtype;
    w_low, the part of it float16 cannot hold (w + w_low is exact to ~2^-22; zero in fp32 mode); and, when
    ONES == 0, bias [16, WP] holding w0 * hidden_b as a float16 high part (row 0) and low part (row 1). When
    ONES > 0 the same two parts sit in w's rows WIDTH and WIDTH + 1 (fed by the constant-one units, whose own
    pre-activation is pi/2) and the returned bias tile is unused.

    This is the only place that reads a stored weight format: int8 codes convert exactly to fp32 by a bit
    trick (0x4B000000 | (q ^ 0x80) is 2^23 + 128 + q as a float; no I2F instruction), float16/float32 by a
    cast; then one multiply by scale * w0. Another code format plugs in here.
    """
    kin = tl.arange(0, WP)[:, None]
    kout = tl.arange(0, WP)[None, :]
    live = (kin < WIDTH) & (kout < WIDTH)
    # Stored [out, in] with row stride WIDTH; rows/columns >= WIDTH are masked (never read).
    q = tl.load(hidden_w_ptr + (wimg * NUM_HIDDEN + layer) * (WIDTH * WIDTH) + kout * WIDTH + kin, mask=live,
                other=0)
    if hidden_w_ptr.dtype.element_ty == tl.int8:
        bits = q.to(tl.uint8, bitcast=True).to(tl.uint32)
        q = ((bits ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
    else:
        q = q.to(tl.float32)
    lw = img * NUM_HIDDEN + layer
    w = q * (tl.load(hidden_scale_ptr + lw) * w0)
    bias = tl.load(hidden_b_ptr + lw * WIDTH + kout, mask=kout < WIDTH, other=0.0).to(tl.float32) * w0
    if DOT_F16:
        hi = bias.to(tl.float16).to(tl.float32)
        lo = bias - hi
        dot_dtype = tl.float16
    else:
        hi = bias
        lo = bias * 0.0
        dot_dtype = tl.float32
    if ONES > 0:
        w = tl.where(kin == WIDTH, tl.where(kout == WIDTH, 1.5707963267948966, hi), w)
        w = tl.where(kin == WIDTH + 1, tl.where(kout == WIDTH + 1, 1.5707963267948966, lo), w)
    w_high = w.to(dot_dtype)
    r = tl.arange(0, 16)[:, None]
    bias_tile = tl.where(r == 0, hi, tl.where(r == 1, lo, 0.0))
    return w_high, (w - w_high.to(tl.float32)).to(dot_dtype), bias_tile.to(dot_dtype)


def _siren_decode_kernel(
    idx_ptr, theta_ptr, out_ptr,
    first_w_ptr, first_b_ptr, hidden_w_ptr, hidden_scale_ptr, hidden_b_ptr, last_w_ptr, last_b_ptr,
    num_images, npix, out_w, tiles_per_image, groups_per_image, tiles_per_program,
    stride_ob, stride_oc, stride_op,
    inv_h, inv_w, first_w0, w0, invalid_value,
    WIDTH: tl.constexpr, WP: tl.constexpr, NUM_HIDDEN: tl.constexpr, ONES: tl.constexpr, LIVE: tl.constexpr,
    BLOCK_P: tl.constexpr, HAS_THETA: tl.constexpr, FAST_SIN: tl.constexpr, RANGE_REDUCE: tl.constexpr,
    DOT_F16: tl.constexpr, SPLIT: tl.constexpr, HIDDEN_BY_BATCH: tl.constexpr, STAGED: tl.constexpr,
    SINE: tl.constexpr, STAGE: tl.constexpr,
):
    # HIDDEN_BY_BATCH: hidden_w_ptr is the batch's own [B,H,W,W] weights (expanded from a compact bank),
    # indexed by batch position instead of image index. stride_op: out's stride between consecutive pixels
    # (out is contiguous or channels_last, so pixel p of an image is at p * stride_op).
    pid = tl.program_id(0)
    b = pid // groups_per_image
    group = pid - b * groups_per_image
    img = tl.load(idx_ptr + b).to(tl.int64)
    valid = (img >= 0) & (img < num_images)
    img = tl.where(valid, img, 0)
    if HIDDEN_BY_BATCH:
        wimg = b.to(tl.int64)
    else:
        wimg = img
    if DOT_F16:
        dot_dtype = tl.float16
    else:
        dot_dtype = tl.float32

    # -- staging: this image's weights, once for all the program's tiles ---------------------------
    k = tl.arange(0, WP)
    kmask = k < WIDTH
    fw = first_w_ptr + img * (WIDTH * 2)
    fx = tl.load(fw + k * 2, mask=kmask, other=0.0).to(tl.float32) * first_w0
    fy = tl.load(fw + k * 2 + 1, mask=kmask, other=0.0).to(tl.float32) * first_w0
    fb = tl.load(first_b_ptr + img * WIDTH + k, mask=kmask, other=0.0).to(tl.float32) * first_w0
    if ONES > 0:
        fb = tl.where((k >= WIDTH) & (k < WIDTH + ONES), 1.5707963267948966, fb)
    r16 = tl.arange(0, 16)[:, None]  # K = 16: one tensor-core step
    c = tl.arange(0, 16)  # output channels, padded to 16 for tl.dot
    cmask = c < 3
    # The first layer's bias enters through a dot with a constant ones operand: exact to ~2^-22 as a float16
    # high + low pair, and it gives the first layer the tensor-core accumulator layout that the hidden
    # layers' dots take as their input without a shared-memory round trip.
    ones = (tl.full((BLOCK_P, 16), 0.0, tl.float32) + tl.where(c < 2, 1.0, 0.0)[None, :]).to(dot_dtype)
    fb_hi = fb.to(dot_dtype).to(tl.float32)
    first_bias = tl.where(r16 == 0, fb_hi[None, :], tl.where(r16 == 1, (fb - fb_hi)[None, :], 0.0)).to(dot_dtype)
    lw = tl.load(last_w_ptr + img * (3 * WIDTH) + c[None, :] * WIDTH + k[:, None],
                 mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    last_w = (lw * 0.5).to(dot_dtype)
    last_b = tl.load(last_b_ptr + img * 3 + c, mask=cmask, other=0.0).to(tl.float32) * 0.5 + 0.5
    last_b = tl.where(valid, last_b, invalid_value)  # NaN pixels for an out-of-range index
    hidden_w = ()
    hidden_low = ()
    hidden_bias = ()
    if STAGED:
        for layer in tl.static_range(NUM_HIDDEN):
            w_l, low_l, b_l = STAGE(hidden_w_ptr, hidden_scale_ptr, hidden_b_ptr, wimg, img, layer, w0,
                                    WIDTH, WP, NUM_HIDDEN, ONES, DOT_F16)
            hidden_w = hidden_w + (w_l,)
            if SPLIT:
                hidden_low = hidden_low + (low_l,)
            if ONES == 0:
                hidden_bias = hidden_bias + (b_l,)
    if HAS_THETA:
        tb = theta_ptr + b.to(tl.int64) * 6
        t00 = tl.load(tb)
        t01 = tl.load(tb + 1)
        t02 = tl.load(tb + 2)
        t10 = tl.load(tb + 3)
        t11 = tl.load(tb + 4)
        t12 = tl.load(tb + 5)
    out_img = out_ptr + b.to(tl.int64) * stride_ob
    live = k < LIVE
    w_f = out_w.to(tl.float32)

    # -- the tiles ------------------------------------------------------------------------------------
    tile0 = group * tiles_per_program
    tile1 = tl.minimum(tile0 + tiles_per_program, tiles_per_image)
    for tile in range(tile0, tile1):
        p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        # Row and column in float (exact below MAX_PIXELS): floor((p + 0.5) / w) by the 1.5*2^23 rounding
        # trick, then one correction step for the rounding of 1/w.
        pf = p.to(tl.float32)
        row = ((pf + 0.5) * inv_w - 0.5 + 12582912.0) - 12582912.0
        col = pf - row * w_f
        row = tl.where(col < 0.0, row - 1.0, tl.where(col >= w_f, row + 1.0, row))
        col = pf - row * w_f
        # Pixel centres, affine_grid(align_corners=False): x = (2j + 1) / w - 1.
        x = col * (2.0 * inv_w) + (inv_w - 1.0)
        y = row * (2.0 * inv_h) + (inv_h - 1.0)
        if HAS_THETA:
            x, y = x * t00 + y * t01 + t02, x * t10 + y * t11 + t12
        z = tl.dot(ones, first_bias, input_precision="ieee")
        z = x[:, None] * fx[None, :] + (y[:, None] * fy[None, :] + z)
        act = SINE(z, FAST_SIN, RANGE_REDUCE).to(dot_dtype)
        if STAGED:
            for layer in tl.static_range(NUM_HIDDEN):
                z = tl.dot(act, hidden_w[layer], input_precision="ieee")
                if SPLIT:
                    z = tl.dot(act, hidden_low[layer], z, input_precision="ieee")
                if ONES == 0:
                    z = tl.dot(ones, hidden_bias[layer], z, input_precision="ieee")
                act = SINE(z, FAST_SIN, RANGE_REDUCE)
                if LIVE < WP:
                    act = tl.where(live[None, :], act, 0.0)
                act = act.to(dot_dtype)
        else:
            for layer in range(NUM_HIDDEN):
                w_l, low_l, b_l = STAGE(hidden_w_ptr, hidden_scale_ptr, hidden_b_ptr, wimg, img, layer, w0,
                                        WIDTH, WP, NUM_HIDDEN, ONES, DOT_F16)
                z = tl.dot(act, w_l, input_precision="ieee")
                if SPLIT:
                    z = tl.dot(act, low_l, z, input_precision="ieee")
                if ONES == 0:
                    z = tl.dot(ones, b_l, z, input_precision="ieee")
                act = SINE(z, FAST_SIN, RANGE_REDUCE)
                if LIVE < WP:
                    act = tl.where(live[None, :], act, 0.0)
                act = act.to(dot_dtype)
        o = tl.dot(act, last_w, input_precision="ieee") + last_b[None, :]
        pix = tl.clamp(o, 0.0, 1.0, propagate_nan=tl.PropagateNan.ALL)
        offs = c[None, :] * stride_oc + p[:, None] * stride_op
        tl.store(out_img + offs, pix.to(out_ptr.dtype.element_ty), mask=(p < npix)[:, None] & cmask[None, :])


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


def _dequant_codes_kernel(idx_ptr, codes_ptr, word_ptr, unpack_ptr, step_ptr, theta0_ptr, dest_ptr, out_ptr,
                          num_images, words_per_image, num_params, batch, invalid_value, BLOCK: tl.constexpr):
    """Program (b, j): parameters [j * BLOCK, (j + 1) * BLOCK) of image idx[b] of a coded bank, decoded as
    grid.values does (float32 product step * q, then + theta0) and stored at their place in the scratch:
    out[dest_base[p] * batch + b * dest_size[p] + dest_within[p]] (dest_ptr: int32 [3, P]), i.e. field by
    field, each field [batch, *shape] contiguous. An out-of-range image index gives `invalid_value` (NaN)."""
    b = tl.program_id(0)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = p < num_params
    img = tl.load(idx_ptr + b).to(tl.int64)
    valid = (img >= 0) & (img < num_images)
    img = tl.where(valid, img, 0)
    word = tl.load(word_ptr + p, mask=live, other=0)
    shift = tl.load(unpack_ptr + p, mask=live, other=0)
    lane = tl.load(unpack_ptr + num_params + p, mask=live, other=0)
    half = tl.load(unpack_ptr + 2 * num_params + p, mask=live, other=0)
    packed = tl.load(codes_ptr + img * words_per_image + word, mask=live, other=0)
    q = ((packed >> shift) & lane) - half  # int32: an arithmetic shift, then the lane's bits
    value = q.to(tl.float32) * tl.load(step_ptr + p, mask=live, other=0.0)
    value = value + tl.load(theta0_ptr + p, mask=live, other=0.0)
    value = tl.where(valid, value, invalid_value)
    base = tl.load(dest_ptr + p, mask=live, other=0).to(tl.int64)
    size = tl.load(dest_ptr + num_params + p, mask=live, other=0).to(tl.int64)
    within = tl.load(dest_ptr + 2 * num_params + p, mask=live, other=0).to(tl.int64)
    tl.store(out_ptr + (base * batch + b.to(tl.int64) * size + within), value, mask=live)


# Integer arguments that change with the output size, the batch or out's layout: not specialized on (16-
# divisibility, == 1), so decoding another size or layout reuses the compiled kernel. Pointers are not
# specialized on 16-byte alignment either: the kernel's loads and stores are element-wise, and a binary that
# does not depend on alignment can be relaunched directly (see _Plan) and is the one kernel_report.py reads.
DECODE_RUNTIME_INTS = ("num_images", "npix", "out_w", "tiles_per_image", "groups_per_image", "tiles_per_program",
                       "stride_ob", "stride_oc", "stride_op")
DECODE_POINTERS = ("idx_ptr", "theta_ptr", "out_ptr", "first_w_ptr", "first_b_ptr", "hidden_w_ptr",
                   "hidden_scale_ptr", "hidden_b_ptr", "last_w_ptr", "last_b_ptr")
# The same for the compact bank's expansion kernel, whose plan is keyed without the bank's image count.
EXPAND_RUNTIME_INTS = ("num_images", "mask_row_bytes")
EXPAND_POINTERS = ("idx_ptr", "masks_ptr", "offsets_ptr", "values_ptr", "out_ptr")
# And for the coded bank's dequantization kernel: its plan is keyed by the block size alone.
DEQUANT_RUNTIME_INTS = ("num_images", "words_per_image", "num_params", "batch")
DEQUANT_POINTERS = ("idx_ptr", "codes_ptr", "word_ptr", "unpack_ptr", "step_ptr", "theta0_ptr", "dest_ptr",
                    "out_ptr")


class _Jitted(NamedTuple):
    decode: object
    sine: object
    stage: object
    expand: object
    add: object
    dequant: object


@functools.lru_cache(maxsize=2)
def _jitted(interpret: bool) -> _Jitted:
    """The jitted kernels and helpers for one mode; triton.jit reads TRITON_INTERPRET when it wraps. The
    interpreter runs the kernel as Python, so its helpers are the plain functions; compiled, the expansion
    kernel's scan uses tl.cumsum/tl.sum (a combine function cannot be a constexpr there), interpreted it
    needs `_add` jitted now (the interpreter calls it through .fn)."""
    return _Jitted(decode=triton.jit(_siren_decode_kernel, do_not_specialize=DECODE_RUNTIME_INTS,
                                     do_not_specialize_on_alignment=DECODE_POINTERS),
                   sine=_sine if interpret else triton.jit(_sine),
                   stage=_stage_hidden_layer if interpret else triton.jit(_stage_hidden_layer),
                   expand=triton.jit(_expand_hidden_kernel, do_not_specialize=EXPAND_RUNTIME_INTS,
                                     do_not_specialize_on_alignment=EXPAND_POINTERS),
                   add=triton.jit(_add) if interpret else None,
                   dequant=triton.jit(_dequant_codes_kernel, do_not_specialize=DEQUANT_RUNTIME_INTS,
                                      do_not_specialize_on_alignment=DEQUANT_POINTERS))


def padded_width(width: int) -> int:
    """Units held for a net of `width`: the next power of two, at least 16 (tl.dot's shapes)."""
    return max(MIN_DOT, triton.next_power_of_2(width))


@functools.lru_cache(maxsize=None)
def supports(arch) -> bool:
    """True when the kernel can decode nets of this architecture (held width <= MAX_PADDED_WIDTH)."""
    return padded_width(arch.width) <= MAX_PADDED_WIDTH


class KernelConfig(NamedTuple):
    """How the kernel decodes one net: its constexpr arguments (without the helper functions) and launch
    options. From `kernel_config`; read by the static report (tools/kernel_report.py) too."""

    constexprs: dict
    num_warps: int
    maxnreg: int | None


def default_tile(held: int) -> tuple[int, int, int | None]:
    """(pixels per tile, warps, register cap) by held width WP, chosen from tools/kernel_report.py's static
    figures (BENCHMARKS.md): 4 warps (one warpgroup: with two, triton 3.9 puts a CTA barrier after every
    wgmma wait) capped at 128 registers; 128-pixel tiles up to 32 units (4-5 programs per SM), 64 beyond."""
    return (128 if held <= 32 else 64), 4, (128 if held <= 64 else None)


@functools.lru_cache(maxsize=None)
def kernel_config(width: int, hidden_layers: int, *, has_theta: bool = True, fast_sin: bool = True,
                  range_reduce: bool = False, fp16_dot: bool = True, hidden_by_batch: bool = False,
                  block_pixels: int | None = None, num_warps: int | None = None) -> KernelConfig:
    """The kernel configuration for a net of `width` x (hidden_layers + 1) sine layers with decode_triton's
    options (see there and the module docstring for the meaning of each constexpr). Cached: one per distinct
    argument set."""
    held = padded_width(width)
    if held > MAX_PADDED_WIDTH:
        raise InrUsageError(f"the triton decoder supports widths up to {MAX_PADDED_WIDTH}, this net has "
                            f"width {width}; use backend='torch'")
    default_pixels, default_warps, maxnreg = default_tile(held)
    if block_pixels is None:
        block_pixels = default_pixels
    elif block_pixels < MIN_DOT or block_pixels & (block_pixels - 1):
        raise InrUsageError(f"block_pixels must be a power of two >= {MIN_DOT}, got {block_pixels}")
    if num_warps is not None:
        maxnreg = None
    ones = ONE_UNITS if held - width >= ONE_UNITS else 0
    live = min(held, -(-(width + ones) // MMA_COLUMNS) * MMA_COLUMNS)
    staged_bytes = hidden_layers * held * held * (2 if fp16_dot else 4)
    staged = hidden_layers <= MAX_STAGED_LAYERS and staged_bytes <= MAX_STAGED_BYTES
    # The float16 low parts of the hidden weights, where their tiles fit too: they halve the fp16 path's
    # error on trained nets (BENCHMARKS.md) for one more tensor-core dot per layer.
    split = fp16_dot and (not staged or 2 * staged_bytes <= MAX_STAGED_BYTES)
    constexprs = dict(WIDTH=int(width), WP=held, NUM_HIDDEN=int(hidden_layers), ONES=ones, LIVE=live,
                      BLOCK_P=int(block_pixels), HAS_THETA=bool(has_theta), FAST_SIN=bool(fast_sin),
                      RANGE_REDUCE=bool(range_reduce), DOT_F16=bool(fp16_dot), SPLIT=bool(split),
                      HIDDEN_BY_BATCH=bool(hidden_by_batch), STAGED=staged)
    return KernelConfig(constexprs, num_warps or default_warps, maxnreg)


PROGRAMS_PER_SM = 16  # programs per SM a launch aims at: about 4 waves of 4 resident programs


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def program_tiles(tiles_per_image: int, batch: int, sm_count: int) -> int:
    """Tiles per program: as many as leaves about PROGRAMS_PER_SM programs per SM (each program stages its
    image's weights once), balanced so that an image's groups differ by at most one tile."""
    want = max(1, -(-tiles_per_image * batch // (sm_count * PROGRAMS_PER_SM)))
    groups = -(-tiles_per_image // min(want, tiles_per_image))
    return -(-tiles_per_image // groups)


class _Plan:
    """What every launch of one kernel configuration on one device shares: the kernel, its constexpr
    arguments, launch options and, once the first launch has compiled it, triton's compiled kernel, which
    later launches call directly (no argument binding or specialization: the kernel is compiled without
    value or alignment specialization, and the plan's key holds everything else it was compiled for)."""

    __slots__ = ("device", "interpret", "kernel", "constexprs", "trailing", "options", "block", "compiled")

    def __init__(self, device, interpret, kernel, constexprs: dict, options: dict, block: int = 0):
        self.device, self.interpret, self.kernel, self.block = device, interpret, kernel, block
        self.constexprs, self.options = constexprs, options
        # A direct launch passes every parameter by position; the constexprs are the kernel's last ones.
        self.trailing = tuple(constexprs[name] for name in kernel.arg_names if name in constexprs)
        self.compiled = None

    def launch(self, grid: tuple[int, int, int], args) -> None:
        """One launch on the device's current stream (so a CUDA graph being captured records it)."""
        if self.interpret:
            self.kernel[grid](*args, **self.constexprs)
        elif self.device.index == torch.cuda.current_device():
            self._launch(grid, args)
        else:
            with torch.cuda.device(self.device):
                self._launch(grid, args)

    def _launch(self, grid, args) -> None:
        if self.compiled is not None:
            self.compiled[grid](*args, *self.trailing)
        else:
            compiled = self.kernel[grid](*args, **self.constexprs, **self.options)
            self.compiled = compiled if callable(getattr(compiled, "__getitem__", None)) else None


_PLANS: dict[tuple, _Plan] = {}


def _decode_plan(key, device, interpret, arch, has_theta, fast_sin, range_reduce, fp16_dot, by_batch,
                 block_pixels, num_warps) -> _Plan:
    config = kernel_config(arch.width, arch.hidden_layers, has_theta=has_theta, fast_sin=fast_sin,
                           range_reduce=range_reduce, fp16_dot=fp16_dot, hidden_by_batch=by_batch,
                           block_pixels=block_pixels, num_warps=num_warps)
    jitted = _jitted(interpret)
    options = {"num_warps": config.num_warps}
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    plan = _Plan(device, interpret, jitted.decode, dict(config.constexprs, SINE=jitted.sine, STAGE=jitted.stage),
                 options, config.constexprs["BLOCK_P"])
    _PLANS[key] = plan
    return plan


def _expand_plan(key, device, interpret, total) -> _Plan:
    jitted = _jitted(interpret)
    plan = _Plan(device, interpret, jitted.expand,
                 dict(TOTAL=total, BLOCK=min(EXPAND_BLOCK, triton.next_power_of_2(total)), INTERPRETED=interpret,
                      ADD=jitted.add), {"num_warps": 4})
    _PLANS[key] = plan
    return plan


def expand_hidden(bank, idx: torch.Tensor) -> torch.Tensor:
    """[B,H,W,W] hidden weights (storage dtype) of images `idx` (int64 on the bank's device) of a compact
    bank, in one launch of one program per image. Same result as bank.hidden_dense(idx). Allocates its
    result; no host synchronization."""
    batch = idx.numel()
    values = bank.hidden_values
    device = values.device
    out = torch.empty((batch, *bank.hidden_shape), dtype=values.dtype, device=device)
    if batch == 0:
        return out
    if values.numel() == 0:  # everything pruned: nothing to read
        return out.zero_()
    interpret = triton_interpreted()
    total = bank.hidden_total
    key = ("expand", device, interpret, total, values.dtype)
    plan = _PLANS.get(key) or _expand_plan(key, device, interpret, total)
    plan.launch((batch, 1, 1), (idx, bank.hidden_masks, bank.hidden_offsets, values, out, bank.num_images,
                           bank.hidden_masks.shape[1]))
    return out


DEQUANT_BLOCK = 1024  # parameters per program of the dequantization kernel
_BANK_WEIGHTS = ("first_w", "first_b", "hidden_scale", "hidden_b", "last_w", "last_b")


def _dequant_plan(key, device, interpret, block) -> _Plan:
    # No FMA contraction: value = float32(step * q) + theta0 rounds twice, exactly as grid.values does.
    plan = _Plan(device, interpret, _jitted(interpret).dequant, dict(BLOCK=block),
                 {"num_warps": 4, "enable_fp_fusion": False})
    _PLANS[key] = plan
    return plan


@functools.lru_cache(maxsize=16)
def _scratch_destinations(arch, device) -> torch.Tensor:
    """int32 [3, P] for _dequant_codes_kernel: per parameter (in group order) the per-image offset of its
    field's start in the scratch (fields in spec.PARAM_CLASSES order, each [batch, *shape]), the field's
    per-image size, and the parameter's offset within its image's part of the field."""
    shapes = arch.shapes()
    sizes = {cls: math.prod(shape) for cls, shape in shapes.items()}
    starts, at = {}, 0
    for cls in PARAM_CLASSES:
        starts[cls] = at
        at += sizes[cls]
    table = torch.empty((3, arch.params_per_image), dtype=torch.int32)
    for g in param_groups(arch):
        within = torch.arange(g.size, dtype=torch.int32) + (g.layer or 0) * g.size
        table[0, g.offset:g.stop] = starts[g.cls]
        table[1, g.offset:g.stop] = sizes[g.cls]
        table[2, g.offset:g.stop] = within
    return table.to(device)


def dequantize_codes(bank, idx: torch.Tensor) -> dict:
    """The float32 parameters of images `idx` (int64 on the bank's device) of a coded bank, as the seven
    tensors of a dense float32 bank of the batch (first_w [B,W,2], ..., hidden_scale ones [B,H]), each
    contiguous, all views of one new buffer; values bit-identical to bank.values(idx). One launch of
    (B, ceil(P / BLOCK)) programs; no host synchronization. An out-of-range index gives NaN parameters."""
    arch, device = bank.arch, bank.codes.device
    batch, p = idx.numel(), arch.params_per_image
    h = arch.hidden_layers
    buffer = torch.empty((batch * (p + h),), dtype=torch.float32, device=device)
    fields, at = {}, 0
    shapes = arch.shapes()
    for cls in PARAM_CLASSES:
        shape = shapes[cls]
        size = batch * math.prod(shape)
        fields[cls] = buffer[at:at + size].view(batch, *shape)
        at += size
    fields["hidden_scale"] = buffer[at:].view(batch, h).fill_(1.0)
    if batch == 0:
        return fields
    interpret = triton_interpreted()
    block = min(DEQUANT_BLOCK, triton.next_power_of_2(p))
    key = ("dequant", device, interpret, block)
    plan = _PLANS.get(key) or _dequant_plan(key, device, interpret, block)
    plan.launch((batch, -(-p // block), 1), (
        idx, bank.codes, bank.code_word, bank.code_unpack, bank.grid.per_param(device)[0], bank.theta0,
        _scratch_destinations(arch, device), buffer, bank.num_images, bank.codes.shape[1], p, batch, math.nan))
    return fields


def check_device(device: torch.device, interpret: bool | None = None) -> None:
    """Raise InrUsageError unless the kernels can run on `device`: CUDA, or anything under TRITON_INTERPRET."""
    if device.type != "cuda" and not (triton_interpreted() if interpret is None else interpret):
        raise InrUsageError(f"the triton decoder needs a CUDA bank (this bank is on {device}); "
                            "set TRITON_INTERPRET=1 to run it in triton's CPU interpreter")


@functools.lru_cache(maxsize=64)
def _grid(npix: int, batch: int, block: int, sm_count: int) -> tuple[int, int, int]:
    """(tiles per image, groups per image, tiles per program) of a launch."""
    tiles = -(-npix // block)
    per_program = program_tiles(tiles, batch, sm_count)
    return tiles, -(-tiles // per_program), per_program


def decode_triton(bank, indices, size, theta=None, *, out=None, dtype=torch.float32, fast_sin=None,
                  range_reduce=False, fp16_dot=True, block_pixels=None, num_warps=None,
                  tiles_per_program=None) -> torch.Tensor:
    """Fused-kernel decode; same arguments and result as decode.decode_torch.

    fast_sin: sin.approx.f32 (default on CUDA; not available in the interpreter). range_reduce=True reduces
    every sine argument to [-pi, pi] first: not needed for accuracy (measured in BENCHMARKS.md: the largest
    |z| of trained and random nets is about 100 in the first layer even with 3x zoomed-out coordinates and
    20 in the hidden layers, where sin.approx adds at most 3e-5 to the pixel error; its argument error
    reaches the 5e-4 tolerance near |z| = 8000), so off by default. fp16_dot=False runs the matmuls in exact
    fp32 ("ieee") for exactness checks. block_pixels, num_warps and tiles_per_program override the launch
    configuration (kernel_config, program_tiles).

    Host cost and graph capture: with `indices` (and `theta`) already on the bank's device and `out`
    preallocated, a call of a dense bank neither synchronizes with the device nor allocates: its argument
    checks read only tensor metadata, and the configuration, grid and compiled kernel are cached per
    argument set and launched directly after the first call (which compiles). Such a call can therefore be
    captured in a CUDA graph after one warm-up call, and replays read the current contents of `indices`,
    `theta` and the bank. A compact bank's call also expands the batch's weights into a [B,H,W,W]
    temporary (one more launch, no synchronization; under capture it comes from the graph's memory pool).
    A coded bank's call likewise dequantizes the batch's parameters into a float32 scratch of B * (P + H)
    values (dequantize_codes) and decodes from it by batch position (a [B] arange, also allocated).
    Host-side indices or theta are checked and copied to the device, which synchronizes. README.md gives
    the measured per-call costs.
    """
    interpret = triton_interpreted()
    device = bank.device
    check_device(device, interpret)
    if fast_sin is None:
        fast_sin = not interpret
    if fast_sin and interpret:
        raise InrUsageError("fast_sin (sin.approx.f32 inline PTX) cannot run in triton's interpreter")
    h, w = parse_size(size)
    npix = h * w
    if npix > MAX_PIXELS:
        raise InrUsageError(f"the triton decoder decodes at most {MAX_PIXELS} pixels per image, {h}x{w} is "
                            f"{npix}; use backend='torch'")
    idx = prepare_indices(bank, indices)
    batch = idx.numel()
    theta = prepare_theta(theta, batch, device)
    out = prepare_out(out, batch, h, w, dtype, device)
    if batch == 0:
        return out
    stride_ob, stride_oc = out.stride(0), out.stride(1)
    stride_op = pixel_stride(out)
    if 2 * abs(stride_oc) + npix * abs(stride_op) >= 2 ** 31 or abs(stride_ob) >= 2 ** 31:
        raise InrUsageError(f"out's strides {list(out.stride())} are too large for the triton decoder's 32-bit "
                            "offsets; use a contiguous or channels_last out")
    arch = bank.arch
    coded = bank.codes is not None
    hidden = bank.hidden_w
    by_batch = hidden is None and not coded
    if coded:  # the batch's dequantized weights (a scratch), read by batch position: a dense float32 "bank"
        weights = dequantize_codes(bank, idx)
        hidden, num_images = weights["hidden_w"], batch
        idx = torch.arange(batch, device=device)
    else:
        weights = {name: getattr(bank, name) for name in _BANK_WEIGHTS}
        num_images = bank.num_images
    key = (device, interpret, arch.width, arch.hidden_layers, theta is not None, fast_sin, range_reduce, fp16_dot,
           by_batch, block_pixels, num_warps, weights["first_w"].dtype,
           (bank.hidden_values if by_batch else hidden).dtype, out.dtype)
    plan = _PLANS.get(key) or _decode_plan(key, device, interpret, arch, theta is not None, bool(fast_sin),
                                           bool(range_reduce), bool(fp16_dot), by_batch, block_pixels, num_warps)
    if tiles_per_program:
        tiles = -(-npix // plan.block)
        groups, per_program = -(-tiles // tiles_per_program), tiles_per_program
    else:
        tiles, groups, per_program = _grid(npix, batch, plan.block, _sm_count(device))
    if batch * groups >= 2 ** 31:
        raise InrUsageError(f"batch {batch} at {h}x{w} needs {batch * groups} programs; decode fewer images at once")
    if by_batch:  # a compact bank's batch, expanded first (a [B,H,W,W] temporary) and read by batch position
        hidden = expand_hidden(bank, idx)
    plan.launch((batch * groups, 1, 1), (
        idx, idx if theta is None else theta, out,
        weights["first_w"], weights["first_b"], hidden, weights["hidden_scale"], weights["hidden_b"],
        weights["last_w"], weights["last_b"],
        num_images, npix, w, tiles, groups, per_program, stride_ob, stride_oc, stride_op,
        1.0 / h, 1.0 / w, arch.first_w0, arch.w0, math.nan))
    return out
