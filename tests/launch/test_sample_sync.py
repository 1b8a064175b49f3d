"""No host synchronisation per steady-state step of guided sampling, for every sampler.

A host sync is an operation whose result the host must read back (`.item()`, `int(t)`, `bool(t)`,
`if t.any()`, data-dependent shapes): on a GPU each one stalls the host until the device has
finished all queued work, so the loop can no longer run ahead. On the CPU we count the ATen
operations that do this under a TorchDispatchMode: sampling with N and with 2N steps must count the
same (whatever is counted happens once per loop, not per step). The same check under CUDA's sync
debug mode runs where a GPU exists.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffusion_core import presets
from diffusion_core.diffusion import PerSampleNoise
from diffusion_core.guidance import ClassifierFreeGuidance, classifier_cond_fn
from launch.sample.guided import GuidedSampler

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# Operations whose result the host reads: every .item() / int() / float() / bool() of a tensor ends in
# _local_scalar_dense; nonzero and equal have data-dependent results that come back to the host.
HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
              torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default}


class HostReads(TorchDispatchMode):
    """Counts the operations in HOST_READS run inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _perturbed(name, seed, **overrides):
    preset = presets.get(name, **overrides)
    module = preset.build()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # fresh ADM nets output exactly 0; perturb so every layer matters
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module.eval().requires_grad_(False), preset


@pytest.fixture(scope="module")
def nets():
    unet, preset = _perturbed("tiny-unet", 1, null_class=True, image_size=8, channel_mult=(1, 2),
                              attention_resolutions=(4,))
    clf, _ = _perturbed("tiny-classifier", 2, image_size=8, channel_mult=(1, 2), attention_resolutions=(4,))
    return unet, preset, clf


def _steps(kind: str, n: int) -> str:
    return {"ddpm": str(n), "ddim": f"ddim{n}", "ddim-eta": f"ddim{n}", "dpm++": f"dpm++2m-{n}"}[kind]


def _reads(fn) -> int:
    with HostReads() as counter:
        fn()
    return counter.count


GUIDANCE = {
    "classifier": dict(classifier_scale="linear:4:1@100:900"),
    "cfg+classifier": dict(classifier_scale=2.0, cfg_scale="3@0:700"),
}


@pytest.mark.parametrize("guidance", sorted(GUIDANCE))
@pytest.mark.parametrize("kind", ["ddpm", "ddim", "ddim-eta", "dpm++"])
def test_guided_sampler_reads_nothing_back_per_step(nets, kind, guidance):
    """GuidedSampler.sample (the job's loop, with per-sample noise and network-batch chunks): the
    same number of host reads for N and 2N steps."""
    unet, preset, clf = nets
    labels = torch.tensor([1, 4, 7])
    counts = []
    for n in (3, 6):
        sampler = GuidedSampler(unet, preset, steps=_steps(kind, n), eta=1.0 if kind == "ddim-eta" else 0.0,
                                classifier=clf, network_batch=2, thresholding=kind == "dpm++", **GUIDANCE[guidance])
        counts.append(_reads(lambda: sampler.sample([11, 12, 13], labels)))
    assert counts[0] == counts[1], f"{counts[1] - counts[0]} host reads in {3} extra steps"


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop", "dpm_solver_sample_loop"])
def test_core_loops_read_nothing_back_per_step(nets, loop):
    """The diffusion core's loops with classifier guidance and a classifier-free-guided model."""
    unet, preset, clf = nets
    model = ClassifierFreeGuidance(unet, "2@0:500", null_label=preset.model.num_classes)
    cond_fn = classifier_cond_fn(clf, 3.0)
    kwargs = {"y": torch.tensor([0, 9])}
    noise = PerSampleNoise([1, 2])
    counts = []
    for n in (3, 6):
        if loop == "dpm_solver_sample_loop":
            diffusion = preset.diffusion.build()
            run = lambda: diffusion.dpm_solver_sample_loop(model, (2, 3, 8, 8), cond_fn=cond_fn,  # noqa: E731
                                                           model_kwargs=kwargs, steps=n, step_noise=noise)
        else:
            import dataclasses

            diffusion = dataclasses.replace(preset.diffusion, timestep_respacing=str(n)).build()
            run = lambda: getattr(diffusion, loop)(model, (2, 3, 8, 8), cond_fn=cond_fn,  # noqa: E731
                                                   model_kwargs=kwargs, step_noise=noise)
        counts.append(_reads(run))
    assert counts[0] == counts[1], counts


def test_the_counter_sees_one_item_per_step(nets):
    """The instrument itself: a model that calls .item() once per call is counted once per step."""
    unet, preset, _ = nets
    diffusion = preset.diffusion.build()

    def model(x, t, **kw):
        float(t[0])
        return unet(x, t, **kw)

    counts = [_reads(lambda: diffusion.dpm_solver_sample_loop(model, (1, 3, 8, 8), model_kwargs={"y": torch.tensor([2])},
                                                              steps=n, noise=torch.zeros(1, 3, 8, 8)))
              for n in (3, 6)]
    assert counts[1] - counts[0] == 3


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["ddpm", "ddim", "dpm++"])
def test_guided_steps_on_a_gpu_never_synchronise(nets, kind):
    """On CUDA: after a warm-up step (tables copied to the device, allocator primed), whole guided
    loops with classifier and classifier-free guidance run under set_sync_debug_mode("error"), which
    raises on any synchronising call (a blocking copy, .item(), a stream synchronise)."""
    unet, preset, clf = nets
    device = torch.device("cuda")
    unet, clf = unet.to(device), clf.to(device)
    sampler = GuidedSampler(unet, preset, steps=_steps(kind, 4), classifier=clf, network_batch=2, device=device,
                            thresholding=kind == "dpm++", **GUIDANCE["cfg+classifier"])
    labels = torch.tensor([1, 4, 7], device=device)
    sampler.sample([1, 2, 3], labels)  # warm-up: first use copies the schedule tables to the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = sampler.sample([1, 2, 3], labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x).all()
