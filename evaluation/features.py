"""Pluggable feature networks: `inception` (the paper's) or `classifier:PATH` (a domain classifier).

A feature network is called on uint8 NHWC images and returns `Features(pool, spatial, logits)`:
`pool` for FID and precision/recall, `spatial` for sFID (None if the network has none), `logits`
for the Inception Score. `num_classes` is set when the logits index the dataset's own classes (then
samples get a class accuracy against their labels); Inception's 1008 outputs do not.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Features(NamedTuple):
    pool: torch.Tensor
    spatial: torch.Tensor | None
    logits: torch.Tensor


class FeatureNetwork:
    """Uniform wrapper: `net(images_uint8_nhwc) -> Features`, plus `name`, `pool_dim`, `spatial_dim`,
    `logit_dim` (default: num_classes), `num_classes` (None unless the logits are the dataset's
    classes) and `device`."""

    def __init__(self, name: str, module: torch.nn.Module, extract, pool_dim: int,
                 spatial_dim: int | None, num_classes: int | None, logit_dim: int | None = None):
        self.name = name
        self.module = module
        self._extract = extract
        self.pool_dim = pool_dim
        self.spatial_dim = spatial_dim
        self.num_classes = num_classes
        self.logit_dim = logit_dim or num_classes
        if not self.logit_dim:
            raise ValueError("a feature network needs logit_dim (or num_classes)")

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @torch.no_grad()
    def __call__(self, images) -> Features:
        images = torch.as_tensor(images).to(self.device)
        if images.dtype != torch.uint8:
            raise ValueError(f"feature networks take uint8 images, got {images.dtype}")
        return Features(*self._extract(images))


def inception_network(module: torch.nn.Module | None = None, weights=None, device="cpu") -> FeatureNetwork:
    """The FID Inception as a FeatureNetwork: `module` if given (e.g. random weights in tests), else
    the released weights found by `evaluation.weights.resolve_inception_weights(weights)`."""
    from evaluation import inception

    if module is None:
        from evaluation.weights import load_fid_inception

        module = load_fid_inception(weights, device=device)
    module = module.to(device).eval()
    return FeatureNetwork("inception", module, lambda x: tuple(module(x)), inception.POOL_DIM,
                          inception.SPATIAL_DIM, None, logit_dim=inception.NUM_LOGITS)


def classifier_network(path_or_module, device="cpu") -> FeatureNetwork:
    """A domain classifier (file written by `train_domain_classifier`, or the module) as a FeatureNetwork."""
    from evaluation.domain_classifier import DomainClassifier, load_domain_classifier

    if isinstance(path_or_module, DomainClassifier):
        module, name = path_or_module.to(device).eval(), "classifier"
    else:
        module, name = load_domain_classifier(path_or_module, device=device), f"classifier:{path_or_module}"
    return FeatureNetwork(name, module, lambda x: tuple(module.extract(x)), module.feature_dim, None,
                          module.config.num_classes)


def load_feature_network(spec: str = "inception", inception_weights=None, device="cpu") -> FeatureNetwork:
    """Parse `--features`: `inception` or `classifier:PATH`."""
    if spec == "inception":
        return inception_network(weights=inception_weights, device=device)
    if spec.startswith("classifier:") and len(spec) > len("classifier:"):
        return classifier_network(spec[len("classifier:"):], device=device)
    raise ValueError(f"unknown --features {spec!r}; use 'inception' or 'classifier:PATH' (a file "
                     f"written by train_domain_classifier)")
