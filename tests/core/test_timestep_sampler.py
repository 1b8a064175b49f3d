"""Timestep samplers: uniform and ADM's loss-second-moment importance sampler."""

import numpy as np
import pytest
import torch

from diffusion_core.diffusion import create_diffusion
from diffusion_core.timestep_sampler import (
    LossSecondMomentSampler,
    UniformSampler,
    create_named_schedule_sampler,
)


def fill(sampler, per_t_losses, rounds):
    """Feed `rounds` losses for every t; per_t_losses[t] is t's loss each round."""
    for _ in range(rounds):
        sampler.update_with_all_losses(torch.arange(len(per_t_losses)), torch.tensor(per_t_losses))


def test_uniform_sampler():
    s = UniformSampler(50)
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    t1, w1 = s.sample(1000, "cpu", generator=g1)
    t2, _ = s.sample(1000, "cpu", generator=g2)
    assert t1.dtype == torch.int64 and w1.dtype == torch.float32
    assert torch.equal(t1, t2) and torch.all(w1 == 1)
    assert int(t1.min()) >= 0 and int(t1.max()) <= 49 and len(set(t1.tolist())) > 40


def test_second_moment_is_uniform_until_every_t_has_ten_losses():
    s = LossSecondMomentSampler(4)
    fill(s, [1.0, 2.0, 3.0, 4.0], 9)
    s.update_with_all_losses([0, 1, 2], [1.0, 2.0, 3.0])  # t = 3 still has only 9
    assert not s.warmed_up()
    np.testing.assert_array_equal(s.weights(), np.ones(4))
    _, w = s.sample(8, generator=torch.Generator().manual_seed(0))
    assert torch.all(w == 1)
    s.update_with_all_losses([3], [4.0])
    assert s.warmed_up()


def test_second_moment_weights_by_hand():
    s = LossSecondMomentSampler(4)
    fill(s, [1.0, 2.0, 3.0, 4.0], 10)
    # sqrt(mean(l^2)) of a constant history is the constant: p = 0.999 * l / 10 + 0.001 / 4.
    expected = 0.999 * np.array([1, 2, 3, 4]) / 10 + 0.001 / 4
    np.testing.assert_allclose(s.probabilities(), expected, rtol=1e-12)
    t, w = s.sample(2000, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(w.numpy(), 1 / (4 * expected[t.numpy()]), rtol=1e-6)
    counts = np.bincount(t.numpy(), minlength=4) / 2000
    np.testing.assert_allclose(counts, expected, atol=0.04)
    # Unbiased: sum_t p_t * w_t * L_t is the uniform mean of L.
    losses = np.array([1.0, 2.0, 3.0, 4.0])
    assert float(np.sum(expected * (1 / (4 * expected)) * losses)) == pytest.approx(losses.mean())


def test_history_keeps_the_last_ten():
    s = LossSecondMomentSampler(2, history_per_term=10)
    fill(s, [1.0, 1.0], 10)
    s.update_with_all_losses([0] * 10, [3.0] * 10)  # t = 0's history is now all 3s
    w = np.array([3.0, 1.0])
    np.testing.assert_allclose(s.probabilities(), 0.999 * w / w.sum() + 0.0005, rtol=1e-12)
    # Second moment: history [0, 0, ..., 0, 4] for t = 0 after nine zeros and one 4.
    s.update_with_all_losses([0] * 9 + [0], [0.0] * 9 + [4.0])
    w = np.array([np.sqrt(16 / 10), 1.0])
    np.testing.assert_allclose(s.probabilities(), 0.999 * w / w.sum() + 0.0005, rtol=1e-12)


def test_state_round_trip_resumes_exactly(tmp_path):
    s = LossSecondMomentSampler(6)
    rng = np.random.default_rng(0)
    for _ in range(15):
        s.update_with_all_losses(rng.integers(0, 6, 8), rng.random(8))
    path = tmp_path / "sampler.pt"
    torch.save(s.state_dict(), path)
    restored = LossSecondMomentSampler(6)
    restored.load_state_dict(torch.load(path, weights_only=True))
    np.testing.assert_array_equal(restored.weights(), s.weights())
    for sampler in (s, restored):
        sampler.update_with_all_losses(torch.arange(6).repeat(10), torch.linspace(0.1, 2, 60))
    a = s.sample(32, generator=torch.Generator().manual_seed(9))
    b = restored.sample(32, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="7 timesteps but this sampler has 6"):
        restored.load_state_dict(LossSecondMomentSampler(7).state_dict())
    with pytest.raises(ValueError, match="different history_per_term"):
        LossSecondMomentSampler(6, history_per_term=5).load_state_dict(s.state_dict())


def test_named_samplers_and_bad_input():
    d = create_diffusion(steps=100)
    assert isinstance(create_named_schedule_sampler("uniform", d), UniformSampler)
    lsm = create_named_schedule_sampler("loss-second-moment", d)
    assert isinstance(lsm, LossSecondMomentSampler) and lsm.num_timesteps == 100
    with pytest.raises(ValueError, match="unknown timestep sampler 'importance'"):
        create_named_schedule_sampler("importance", 100)
    with pytest.raises(ValueError, match="out of range"):
        lsm.update_with_all_losses([100], [1.0])
    with pytest.raises(ValueError, match="one loss per timestep"):
        lsm.update_with_all_losses([1, 2], [1.0])
    with pytest.raises(ValueError, match="batch_size"):
        lsm.sample(0)
