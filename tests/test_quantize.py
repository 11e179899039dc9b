"""Quantization error bounds, L1 pruning masks, the dynamic prune-ratio rule and preset schedules."""

import numpy as np
import pytest
import torch

from inrfmt.errors import InrUsageError
from inrfmt.presets import CIFAR10_RULE, LARGE_RULE, PRESETS, PruneRule, get_preset
from inrfmt.quantize import dequantize_hidden, dynamic_ratio, mask_ratio, prune_masks, quantize_hidden


def paper_cifar(p):  # the paper's formula, written out independently
    return 0.0 if p < 30 else (0.05 * p - 1.5 if p <= 35 else 0.25)


def paper_large(p):
    return 0.2 if p < 35 else (0.04 * p - 1.2 if p <= 40 else 0.4)


@pytest.mark.parametrize("rule,paper", [(CIFAR10_RULE, paper_cifar), (LARGE_RULE, paper_large)])
def test_dynamic_ratio_is_the_paper_rule(rule, paper):
    psnrs = np.concatenate([np.linspace(10, 50, 401), [29.999, 30, 35, 35.001, 40, 40.0001]])
    got = dynamic_ratio(torch.tensor(psnrs), rule).numpy()
    want = np.array([paper(p) for p in psnrs])
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_dynamic_ratio_breakpoints_are_parameters():
    rule = PruneRule(low_psnr=20.0, high_psnr=24.0, low_ratio=0.1, high_ratio=0.5)
    got = dynamic_ratio(torch.tensor([0.0, 20.0, 21.0, 22.0, 24.0, 99.0, float("nan")]), rule)
    np.testing.assert_allclose(got.numpy(), [0.1, 0.1, 0.2, 0.3, 0.5, 0.5, 0.1], atol=1e-12)
    with pytest.raises(ValueError):
        PruneRule(low_psnr=35.0, high_psnr=30.0, low_ratio=0.0, high_ratio=0.2)
    with pytest.raises(ValueError):
        PruneRule(low_psnr=30.0, high_psnr=35.0, low_ratio=0.0, high_ratio=1.0)


def test_prune_masks_prune_exactly_the_smallest():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 2, 6, 6, generator=g)
    ratios = torch.tensor([0.0, 0.1, 0.2, 0.25, 0.4])
    keep = prune_masks(w, ratios)
    total = 2 * 36
    for n in range(5):
        k = round(float(ratios[n]) * total)  # Python rounds half to even, as torch's prune does
        pruned = ~keep[n].reshape(-1)
        assert int(pruned.sum()) == k
        if 0 < k < total:
            mags = w[n].reshape(-1).abs()
            assert mags[pruned].max() <= mags[~pruned].min()
    np.testing.assert_allclose(mask_ratio(keep).numpy(), [round(float(r) * total) / total for r in ratios])


def test_prune_count_rounds_half_to_even_like_torch_prune():
    w = torch.randn(2, 2, 15, 15)  # the CIFAR-10 net: 450 hidden weights; 0.25 * 450 = 112.5
    keep = prune_masks(w, torch.tensor([0.25, 0.05], dtype=torch.float64))
    assert [int((~k).sum()) for k in keep] == [112, 22]  # 22.5 -> 22 as well


def test_prune_masks_keep_earlier_pruning():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 2, 5, 5, generator=g)
    first = prune_masks(w, torch.full((3,), 0.2))
    w2 = (w + 0.3 * torch.randn(3, 2, 5, 5, generator=g)) * first  # fine-tuned; pruned stay zero
    second = prune_masks(w2, torch.tensor([0.1, 0.2, 0.4]), keep=first)  # 0.1 < 0.2 already pruned: nothing unpruned
    assert not torch.any(second & ~first)
    np.testing.assert_allclose(mask_ratio(second).numpy(), [0.2, 0.2, 0.4])


def test_int8_quantization_error_bound():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 3, 8, 8, generator=g) * torch.tensor([0.01, 0.1, 1.0])[None, :, None, None]
    w[1, 2] = 0.0  # an all-zero layer (fully pruned)
    w[2, 0, 0, :4] = 0.0  # pruned weights
    q, scale = quantize_hidden(w, "int8")
    assert q.dtype == torch.int8 and scale.shape == (4, 3)
    peak = w.abs().amax(dim=(2, 3))
    nz = peak > 0
    assert torch.allclose(scale[nz], peak[nz] / 127)
    assert float(scale[1, 2]) == 1.0
    assert int(q.abs().amax()) == 127
    deq = dequantize_hidden(q, scale)
    err = (deq - w).abs()
    assert torch.all(err <= scale[:, :, None, None] / 2 * (1 + 1e-5) + 1e-12)
    assert torch.all(deq[2, 0, 0, :4] == 0) and torch.all(deq[1, 2] == 0)


def test_float_quantization():
    w = torch.randn(2, 2, 4, 4)
    q16, s16 = quantize_hidden(w, "float16")
    assert q16.dtype == torch.float16 and torch.all(s16 == 1)
    assert torch.allclose(dequantize_hidden(q16, s16), w, rtol=1e-3, atol=1e-4)
    q32, s32 = quantize_hidden(w, "float32")
    assert q32.dtype == torch.float32 and torch.equal(dequantize_hidden(q32, s32), w)
    with pytest.raises(ValueError):
        quantize_hidden(w, "int4")


def test_preset_schedules():
    cifar = get_preset("rapid-inr-cifar10")
    assert (cifar.arch.sine_layers, cifar.arch.width) == (3, 15)
    assert [(r.steps, r.lr, r.prune) for r in cifar.rounds] == [(5000, 5e-4, "none"), (10000, 2e-4, "dynamic")]
    flowers, mini = get_preset("rapid-inr-flowers102"), get_preset("rapid-inr-mini-imagenet")
    assert (flowers.arch.sine_layers, flowers.arch.width, mini.arch.width) == (10, 32, 40)
    assert [(r.steps, r.prune, r.ratio) for r in flowers.rounds] == [(5000, "none", 0.0), (10000, "fixed", 0.2),
                                                                     (10000, "dynamic", 0.0)]
    assert flowers.prune_rule == mini.prune_rule == LARGE_RULE
    assert [r.steps for r in flowers.schedule(500)] == [500, 1000, 1000]
    assert [r.steps for r in cifar.schedule(50)] == [50, 100]
    assert [r.steps for r in cifar.schedule(1)] == [1, 2]
    assert [r.steps for r in flowers.schedule(prune=False)] == [5000]
    assert {"fast", "rapid-inr-cifar10", "rapid-inr-flowers102", "rapid-inr-mini-imagenet"} <= set(PRESETS)
    with pytest.raises(InrUsageError, match="nope"):
        get_preset("nope")
