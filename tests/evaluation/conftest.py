"""Fixtures shared by the evaluation tests: a randomised FID Inception, MNIST digits, a small classifier."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from evaluation.inception import ConvUnit, FIDInception


def randomise_inception(seed: int = 0) -> FIDInception:
    """FIDInception with random He-scaled weights and random, but well-scaled, batch-norm statistics.

    Default-initialised batch norms (mean 0, var 1) on random convolutions collapse the activations
    after a few blocks; here each layer's running mean/variance are set from a calibration batch and
    then perturbed, so every output (pool, spatial, logits) varies with the input.
    """
    gen = torch.Generator().manual_seed(seed)
    model = FIDInception()
    units = [m for m in model.modules() if isinstance(m, ConvUnit)]
    hooks = []
    for unit in units:
        w = unit.conv.weight
        fan_in = w[0].numel()
        w.copy_(torch.randn(w.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
        unit.bn.weight.copy_(0.5 + torch.rand(w.shape[0], generator=gen))
        unit.bn.bias.copy_(0.3 * torch.randn(w.shape[0], generator=gen))

        def calibrate(module, inputs, output, bn=unit.bn):
            mean = output.mean(dim=(0, 2, 3))
            var = output.var(dim=(0, 2, 3)) + 1e-3
            bn.running_mean.copy_(mean + 0.2 * var.sqrt() * torch.randn(mean.shape, generator=gen))
            bn.running_var.copy_(var * (0.7 + 0.6 * torch.rand(var.shape, generator=gen)))

        hooks.append(unit.conv.register_forward_hook(calibrate))
    model.fc.weight.copy_(torch.randn(model.fc.weight.shape, generator=gen) * 0.05)
    model.fc.bias.copy_(torch.randn(model.fc.bias.shape, generator=gen))
    x = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return model.eval()


@pytest.fixture(scope="session")
def _inception_master():
    return randomise_inception(0)


@pytest.fixture
def random_inception(_inception_master):
    return copy.deepcopy(_inception_master)


@pytest.fixture(scope="session")
def digits():
    """5,000 real MNIST digits as 32x32x3 uint8 greys (padded like the demo) and their labels."""
    from data.digits import load_mnist_digits

    x, y = load_mnist_digits()
    img = np.pad(x, ((0, 0), (2, 2), (2, 2))).astype(np.uint8)
    img = np.repeat(img[..., None], 3, axis=-1)
    order = np.random.default_rng(0).permutation(len(img))
    return img[order], y[order].astype(np.int64)


@pytest.fixture(scope="session")
def small_classifier(digits, tmp_path_factory):
    """A small domain classifier trained for a few seconds, and its file."""
    from evaluation.domain_classifier import train_domain_classifier

    images, labels = digits
    path = tmp_path_factory.mktemp("clf") / "clf.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: threads cost more in synchronisation than they give
    try:
        model, info = train_domain_classifier((images[:1500], labels[:1500]), path, widths=(16, 32, 32),
                                              epochs=3, batch_size=32, lr=5e-3, log=None)
    finally:
        torch.set_num_threads(threads)
    return model, path, info
