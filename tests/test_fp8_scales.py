"""The fp8 GEMMs' activation rows take power-of-two scales: a last-bit change of a row's
largest element, which another batch split's sum order upstream can cause, then re-rounds no
other element; with exact scales it re-rounds many. The CUDA row quantizer's scales are
tested against these in tests/test_kernels_fp8_linear.py."""

from __future__ import annotations

import torch

from afd.quantization import fp8_round_trip, power_of_two_scales, quantize_fp8


def test_power_of_two_scales_round_up() -> None:
    big = 1.5 * 2.0**127  # from 2^127 on: as it is (the next power of two is inf)
    s = torch.tensor([0.0, 1.0, 0.75, 3.0e-3, 2.0**-130, 2.0**100 * 1.1, big, float("inf")])
    want = [0.0, 1.0, 1.0, 2.0**-8, 2.0**-126, 2.0**101, big, float("inf")]
    assert power_of_two_scales(s).tolist() == want
    assert power_of_two_scales(torch.tensor([float("nan")])).isnan().all()


def _bump_largest(x: torch.Tensor) -> torch.Tensor:
    """x with each row's largest magnitude moved by one bf16 unit in the last place."""
    at = x.abs().argmax(-1, keepdim=True)
    up = x.gather(-1, at).to(torch.bfloat16).view(torch.int16) + 1  # magnitude up, either sign
    return x.scatter(-1, at, up.view(torch.bfloat16).float())


def test_a_last_bit_change_of_the_largest_element_rounds_no_other_element_anew() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=g).to(torch.bfloat16).float()
    bumped = _bump_largest(x)
    moved = bumped != x  # only the largest element of each row
    assert moved.sum(-1).eq(1).all()
    changed = {}
    for pow2 in (False, True):
        (a, sa), (b, sb) = quantize_fp8(x, pow2), quantize_fp8(bumped, pow2)
        same_codes = a.view(torch.uint8) == b.view(torch.uint8)
        changed[pow2] = int((~same_codes & ~moved).sum())
        if pow2:  # the scale stays unless the largest crosses a power of two (none here)
            assert torch.equal(sa, sb)
    assert changed[True] == 0
    assert changed[False] > 1000  # exact scales: ~30 of each row's other 511 re-round


def test_round_trip_takes_power_of_two_scales_within_e4m3_rounding() -> None:
    """fp8_round_trip (the CPU paths' activations) is quantize_fp8 with power-of-two scales."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 300, generator=g) * torch.logspace(-4, 4, 16)[:, None]
    x[3] = 0.0
    back = fp8_round_trip(x)
    quant, scale = quantize_fp8(x, power_of_two=True)
    assert torch.equal(back, quant.float() * scale[:, None])
    exact = x.abs().amax(-1) / 448
    assert torch.equal(scale, power_of_two_scales(exact)) and not torch.equal(scale, exact)
    bound = 2**-4 * x.abs() + 2**-10 * scale[:, None]  # half a subnormal step of the scale
    assert ((back - x).abs() <= bound).all() and (back[3] == 0).all()
