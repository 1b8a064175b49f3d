"""Respacing: kept index sets worked out by hand from ADM_SPEC §2, and the respaced chain."""

import numpy as np
import pytest
import torch

from diffusion_core.diffusion import create_diffusion, space_timesteps

# "10,10,10" at T=1000: sections of 334, 333, 333 steps starting at 0, 334, 667.
# Section 0: stride 333/9 = 37 exactly. Sections 1 and 2: stride 332/9 = 36.888..., so the
# offsets are round(36.89 i) = 0, 37, 74, 111, 148, 184, 221, 258, 295, 332.
TEN_TEN_TEN = (
    [0, 37, 74, 111, 148, 185, 222, 259, 296, 333]
    + [334 + o for o in (0, 37, 74, 111, 148, 184, 221, 258, 295, 332)]
    + [667 + o for o in (0, 37, 74, 111, 148, 184, 221, 258, 295, 332)]
)

# "25" at T=1000: stride 999/24 = 41.625 (exact in binary). Ties at 166.5 -> 166,
# 499.5 -> 500 and 832.5 -> 832 (Python's round: ties to even; half-up would give 167, 833).
TWENTY_FIVE = [
    0, 42, 83, 125, 166, 208, 250, 291, 333, 375, 416, 458, 500,
    541, 583, 624, 666, 708, 749, 791, 832, 874, 916, 957, 999,
]


def test_ten_ten_ten_by_hand():
    assert space_timesteps(1000, "10,10,10") == TEN_TEN_TEN
    assert TEN_TEN_TEN[10:15] == [334, 371, 408, 445, 482] and TEN_TEN_TEN[15] == 518
    assert TEN_TEN_TEN[-5] == 851 and TEN_TEN_TEN[-1] == 999


def test_twenty_five_ties_to_even():
    kept = space_timesteps(1000, "25")
    assert kept == TWENTY_FIVE
    assert 166 in kept and 167 not in kept and 832 in kept and 833 not in kept


def test_ddim_strides():
    # ddim25: stride 39 gives 26 entries, stride 40 gives 25 -> 0, 40, ..., 960 (never 999).
    assert space_timesteps(1000, "ddim25") == list(range(0, 961, 40))
    # ddim50: stride 19 gives 53 entries, stride 20 gives 50 -> 0, 20, ..., 980.
    assert space_timesteps(1000, "ddim50") == list(range(0, 981, 20))


def test_empty_and_full_and_single():
    assert space_timesteps(1000, "") == list(range(1000))
    assert space_timesteps(1000, "1000") == list(range(1000))
    assert space_timesteps(10, "1") == [0]
    # Uneven split: 10 steps in 3 sections of 4, 3, 3; two points per section keep both ends.
    assert space_timesteps(10, "2,2,2") == [0, 3, 4, 6, 7, 9]


def test_respaced_chain_keeps_alphas_cumprod():
    base = create_diffusion(steps=1000, noise_schedule="cosine")
    spaced = create_diffusion(steps=1000, noise_schedule="cosine", timestep_respacing="10,10,10")
    assert spaced.num_timesteps == 30
    assert spaced.timestep_map.dtype == np.int64
    assert spaced.timestep_map.tolist() == TEN_TEN_TEN
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[TEN_TEN_TEN], rtol=1e-9)
    # beta'_0 = 1 - abar_0 (abar of "index -1" is 1); beta'_i = 1 - abar_k_i / abar_k_{i-1}.
    assert spaced.betas[0] == pytest.approx(base.betas[0], rel=1e-12)
    expected = 1 - base.alphas_cumprod[371] / base.alphas_cumprod[334]
    assert spaced.betas[11] == pytest.approx(expected, rel=1e-12)
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1"):
        assert getattr(spaced, name).dtype == np.float64


def test_model_and_cond_fn_receive_original_timesteps():
    diffusion = create_diffusion(timestep_respacing="ddim25", learn_sigma=False)
    seen_model, seen_cond = [], []

    def model(x, t, **kwargs):
        seen_model.append(t.clone())
        return torch.zeros_like(x)

    def cond_fn(x, t, **kwargs):
        seen_cond.append(t.clone())
        return torch.zeros_like(x)

    diffusion.ddim_sample_loop(model, (2, 1, 2, 2), cond_fn=cond_fn)
    diffusion.p_sample_loop(model, (2, 1, 2, 2), cond_fn=cond_fn)
    expected = list(range(960, -1, -40)) * 2
    assert [int(t[0]) for t in seen_model] == expected
    assert [int(t[0]) for t in seen_cond] == expected
    assert all(t.dtype == torch.int64 for t in seen_model + seen_cond)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("ddim999", "no integer stride"),
        ("10,10,400", "at most 333"),
        ("1001", "at most 1000"),
        ("abc", "comma-separated"),
        ("ddimX", "ddimN"),
        ("10,0", ">= 1"),
    ],
)
def test_bad_respacing_names_the_problem(spec, words):
    with pytest.raises(ValueError, match=words):
        create_diffusion(timestep_respacing=spec)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown noise_schedule 'quadratic'.*linear, cosine"):
        create_diffusion(noise_schedule="quadratic")
