"""The sampler in one process: files, reproducibility, guidance, refusals, OpenAI weights, ADM-U, CLI.

Models are the tiny presets with random weights. A fresh ADM network has zero-initialised output
layers (its eps and v are exactly 0), which would make most checks vacuous, so every weight gets a
small seeded perturbation: the outputs then depend on every layer and on the labels.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from diffusion_core import presets
from diffusion_core.diffusion import PerSampleNoise
from diffusion_core.guidance import classifier_cond_fn
from diffusion_core.openai_compat import to_openai_state_dict
from launch import cli
from launch.sample import files as sf
from runtime.npz import write_streamed_npz
from launch.model_io import load_model, save_model_file
from launch.sample.guided import GuidedSampler
from launch.sample.job import sample
from launch.sample.options import Labels, SampleOptions, sample_seed


def _perturbed(name, seed, **overrides):
    preset = presets.get(name, **overrides)
    module = preset.build()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module.eval(), preset


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Model files of ours: diffusion, classifier, CFG diffusion (null class), upsampler, odd ones."""
    root = tmp_path_factory.mktemp("models")
    specs = {
        "unet": ("tiny-unet", 1, {}),
        "clf": ("tiny-classifier", 2, {}),
        "cfg": ("tiny-unet", 3, {"null_class": True}),
        "up": ("tiny-upsampler", 4, {}),
        "clf8": ("tiny-classifier", 5, {"image_size": 8}),
        "clf_cos": ("tiny-classifier", 6, {"diffusion.noise_schedule": "cosine"}),
    }
    paths = {}
    for key, (name, seed, overrides) in specs.items():
        module, preset = _perturbed(name, seed, **overrides)
        paths[key] = str(save_model_file(root / f"{key}.pt", module.state_dict(), preset))
    return paths


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _opts(models, out, **kw):
    base = dict(model=models["unet"], out=str(out), num_samples=6, batch_size=4, steps="2", shard_size=4,
                progress=False, grid_size=4)
    base.update(kw)
    return SampleOptions(**base)


def _arrays(path):
    with np.load(path) as z:
        return z["arr_0"], z["arr_1"]


def test_guided_file_options_and_agreement_with_the_core_loop(models, tmp_path):
    path = sample(_opts(models, tmp_path / "g", classifier=models["clf"], classifier_scale=4.0))
    assert path.name == "samples_6x16x16x3.npz"
    images, labels = _arrays(path)
    assert images.dtype == np.uint8 and images.shape == (6, 16, 16, 3)
    assert labels.dtype == np.int64 and labels.min() >= 0 and labels.max() < 10
    assert images.std() > 5  # real pictures, not a constant
    options = json.loads((tmp_path / "g" / "options.json").read_text())
    for key, value in {"classifier_scale": 4.0, "cfg_scale": None, "steps": "2", "sampler": "ddpm", "seed": 0,
                       "num_samples": 6, "samples_file": path.name, "model": models["unet"]}.items():
        assert options[key] == value, key
    assert len(options["content"]["model_sha256"]) == 64 and len(options["content"]["classifier_sha256"]) == 64
    assert (tmp_path / "g" / "grid.png").is_file() and not (tmp_path / "g" / "shards").exists()

    # The first batch again, with the diffusion core's own loop and PerSampleNoise: same bytes.
    unet, preset = load_model(models["unet"])
    clf, _ = load_model(models["clf"])
    diffusion = dataclasses.replace(preset.diffusion, timestep_respacing="2").build()
    seeds = [sample_seed(0, i) for i in range(4)]
    noise = PerSampleNoise(seeds)
    x_t = noise.initial((4, 3, 16, 16))
    y = torch.from_numpy(labels[:4])
    out = diffusion.p_sample_loop(unet, x_t.shape, noise=x_t, step_noise=noise, model_kwargs={"y": y},
                                  cond_fn=classifier_cond_fn(clf, 4.0))
    np.testing.assert_array_equal(sf.to_uint8(out).numpy(), images[:4])

    # Same options again: nothing to do, same file.
    before = path.stat().st_mtime_ns
    assert sample(_opts(models, tmp_path / "g", classifier=models["clf"], classifier_scale=4.0)) == path
    assert path.stat().st_mtime_ns == before


def test_independent_of_shard_layout_and_n_and_close_across_batch_sizes(models, tmp_path):
    """Fixed batch size: bitwise the same for any shard size and N (each sample always meets the
    networks in a batch of B, with other companions). Other batch sizes with the default network
    batch (= the batch size): CPU kernels change the last bits with the rows per call, so only
    closeness is promised."""
    kw = dict(classifier=models["clf"], steps="3", batch_size=4)
    ref_images, ref_labels = _arrays(sample(_opts(models, tmp_path / "ref", num_samples=7, shard_size=8, **kw)))
    for n, s in ((7, 3), (5, 2)):
        images, labels = _arrays(sample(_opts(models, tmp_path / f"n{n}s{s}", num_samples=n, shard_size=s, **kw)))
        np.testing.assert_array_equal(images, ref_images[:n])
        np.testing.assert_array_equal(labels, ref_labels[:n])
    for b in (1, 3):
        images, labels = _arrays(sample(_opts(models, tmp_path / f"b{b}", num_samples=7, shard_size=7,
                                              **{**kw, "batch_size": b})))
        np.testing.assert_array_equal(labels, ref_labels)
        diff = np.abs(images.astype(int) - ref_images.astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.999, (diff.max(), (diff == 0).mean())


def test_bitwise_the_same_for_every_batch_size_with_a_fixed_network_batch(models, tmp_path):
    """--network-batch fixes the rows of every network call: any batch size (a multiple of it or
    not, with padded chunks) and any shard layout give the same bytes, guided and class-balanced."""
    kw = dict(classifier=models["clf"], classifier_scale=4.0, steps="3", labels="balanced", num_samples=9,
              network_batch=2)
    ref = _arrays(sample(_opts(models, tmp_path / "b2", batch_size=2, shard_size=4, **kw)))
    for b, s in ((3, 9), (4, 5), (7, 7), (9, 2)):
        got = _arrays(sample(_opts(models, tmp_path / f"b{b}s{s}", batch_size=b, shard_size=s, **kw)))
        np.testing.assert_array_equal(got[0], ref[0], err_msg=f"batch size {b}, shard size {s}")
        np.testing.assert_array_equal(got[1], ref[1])
    # And the chunking is only a schedule: batch 2 with network batch 2 is the default mode's run.
    plain = _arrays(sample(_opts(models, tmp_path / "plain", batch_size=2, shard_size=4,
                                 **{**kw, "network_batch": None})))
    np.testing.assert_array_equal(plain[0], ref[0])


def test_resuming_with_another_batch_size_keeps_shards_and_names_a_changed_network_batch(models, tmp_path, capsys):
    out = tmp_path / "r"
    kw = dict(num_samples=6, shard_size=2, steps="2", keep_shards=True)
    first = _arrays(sample(_opts(models, out, batch_size=2, **kw)))
    shards = sorted((out / "shards").glob("*.npz"))
    for path in shards[1:]:  # as if the job had been stopped after its first shard
        path.unlink()
    (out / "options.json").unlink()
    capsys.readouterr()
    again = _arrays(sample(_opts(models, out, batch_size=4, network_batch=2, **kw)))
    printed = capsys.readouterr().out
    assert "1 of 3 shards already done" in printed and "note:" not in printed
    np.testing.assert_array_equal(again[0], first[0])
    for path in sorted((out / "shards").glob("*.npz"))[1:]:
        path.unlink()
    (out / "options.json").unlink()
    sample(_opts(models, out, batch_size=3, **kw))
    assert "made with network batch [2], this run uses 3" in capsys.readouterr().out


@pytest.mark.parametrize("steps", ["3", "dpm++2m-3"])
def test_network_batch_gives_the_same_float_bits_whatever_the_rows_sampled_together(models, steps):
    """In float32, not only after uint8 rounding: with network_batch=2 the rows of a batch of 6 (three
    chunks) and of a batch of 5 (the last chunk padded) equal the same rows sampled two at a time;
    without it the batch of 6 differs in the last bits (which is why the option exists). For guided
    DDPM and for DPM-Solver++ with thresholding (its model, classifier and quantile run per chunk)."""
    unet, preset = load_model(models["unet"])
    clf, _ = load_model(models["clf"])
    seeds = [sample_seed(3, i) for i in range(6)]
    labels = torch.tensor([0, 3, 5, 7, 9, 1])

    def run(rows, network_batch):
        sampler = GuidedSampler(unet, preset, steps=steps, classifier=clf, classifier_scale=4.0,
                                network_batch=network_batch, thresholding=steps.startswith("dpm"))
        return sampler.sample(seeds[rows], labels[rows])

    pairs = torch.cat([run(slice(k, k + 2), None) for k in (0, 2, 4)])
    assert torch.equal(run(slice(0, 6), 2), pairs)
    assert torch.equal(run(slice(0, 5), 2), pairs[:5])
    assert not torch.equal(run(slice(0, 6), None), pairs)


def test_guidance_changes_samples_and_every_mode_runs(models, tmp_path):
    plain, labels = _arrays(sample(_opts(models, tmp_path / "plain", num_samples=4)))
    guided, guided_labels = _arrays(sample(_opts(models, tmp_path / "clf", num_samples=4, classifier=models["clf"],
                                                 classifier_scale=8.0)))
    np.testing.assert_array_equal(labels, guided_labels)  # labels are per index, not per mode
    assert (plain != guided).mean() > 0.05  # 2 steps of random nets saturate many pixels; the rest move
    scheduled, _ = _arrays(sample(_opts(models, tmp_path / "sched", num_samples=4, classifier=models["clf"],
                                        classifier_scale="linear:8:0")))
    assert not np.array_equal(scheduled, guided)
    cfg, _ = _arrays(sample(_opts(models, tmp_path / "cfg", model=models["cfg"], num_samples=4, cfg_scale=3.0)))
    both, _ = _arrays(sample(_opts(models, tmp_path / "both", model=models["cfg"], num_samples=4, cfg_scale=3.0,
                                   classifier=models["clf"], classifier_scale=8.0)))
    assert not np.array_equal(cfg, both)
    ddim, _ = _arrays(sample(_opts(models, tmp_path / "ddim", num_samples=4, steps="ddim2")))
    ddim_eta, _ = _arrays(sample(_opts(models, tmp_path / "eta", num_samples=4, steps="ddim2", eta=1.0)))
    assert not np.array_equal(ddim, ddim_eta)
    options = json.loads((tmp_path / "ddim" / "options.json").read_text())
    assert options["sampler"] == "ddim" and options["num_steps"] == 2


def test_a_sampler_step_with_openai_weights_matches_the_core_step(models, tmp_path):
    unet, preset = _perturbed("tiny-unet", 11)
    clf, _ = _perturbed("tiny-classifier", 12)
    torch.save(to_openai_state_dict(unet), tmp_path / "unet_openai.pt")
    torch.save(to_openai_state_dict(clf), tmp_path / "clf_openai.pt")
    unet2, preset2 = load_model(f"openai:{tmp_path / 'unet_openai.pt'}", preset="tiny-unet")
    clf2, _ = load_model(f"openai:{tmp_path / 'clf_openai.pt'}", preset="tiny-classifier")
    for kind, steps in (("ddpm", "3"), ("ddim", "ddim3")):
        sampler = GuidedSampler(unet2, preset2, steps=steps, classifier=clf2, classifier_scale=2.0)
        core = sampler.diffusion
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(3, 3, 16, 16, generator=gen)
        noise = torch.randn(3, 3, 16, 16, generator=gen)
        y = torch.tensor([0, 4, 9])
        for i in (2, 0):
            ours = sampler.step(x, i, sampler.model_kwargs(y, None), noise)
            t = torch.full((3,), i)
            if kind == "ddpm":
                ref = core.p_sample(unet, x, t, cond_fn=classifier_cond_fn(clf, 2.0), model_kwargs={"y": y}, noise=noise)
            else:
                ref = core.ddim_sample(unet, x, t, cond_fn=classifier_cond_fn(clf, 2.0), model_kwargs={"y": y})
            torch.testing.assert_close(ours["sample"], ref["sample"], rtol=0, atol=0)
            torch.testing.assert_close(ours["pred_xstart"], ref["pred_xstart"], rtol=0, atol=0)


def test_upsampling_stage(models, tmp_path):
    rng = np.random.default_rng(0)
    base = tmp_path / "base.npz"
    low = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    base_labels = np.array([3, 1, 4, 1, 5], dtype=np.int64)
    write_streamed_npz(base, [low], [base_labels], 5, (8, 8, 3))
    opts = dict(model=models["up"], upsample_from=str(base), num_samples=None, batch_size=2, shard_size=2)
    path = sample(_opts(models, tmp_path / "up", **opts))
    images, labels = _arrays(path)
    assert path.name == "samples_5x16x16x3.npz" and images.shape == (5, 16, 16, 3)
    np.testing.assert_array_equal(labels, base_labels)
    # Conditioned on the base image: a different low-res picture changes the result.
    low2 = low.copy()
    low2[0] = 255 - low2[0]
    write_streamed_npz(tmp_path / "base2.npz", [low2], [base_labels], 5, (8, 8, 3))
    images2, _ = _arrays(sample(_opts(models, tmp_path / "up2", **{**opts, "upsample_from": str(tmp_path / "base2.npz")})))
    assert not np.array_equal(images2[0], images[0])
    np.testing.assert_array_equal(images2[1:], images[1:])
    with pytest.raises(ValueError, match="takes 8x8"):
        sample(_opts(models, tmp_path / "bad", model=models["up"], upsample_from=path, num_samples=None))
    with pytest.raises(ValueError, match="--upsample-from"):
        sample(_opts(models, tmp_path / "bad", model=models["up"]))


def test_refusals_and_warnings(models, tmp_path):
    with pytest.raises(ValueError, match="classifier takes 8px"):
        sample(_opts(models, tmp_path / "a", classifier=models["clf8"]))
    bad_labels = tmp_path / "labels.txt"
    bad_labels.write_text("1\n2\n10\n3\n4\n5\n")
    with pytest.raises(ValueError, match=r"\[0, 10\).*\[10\]"):
        sample(_opts(models, tmp_path / "a", labels=str(bad_labels)))
    with pytest.raises(ValueError, match="null class"):
        sample(_opts(models, tmp_path / "a", cfg_scale=2.0))
    with pytest.raises(ValueError, match="needs a classifier"):
        sample(_opts(models, tmp_path / "a", classifier_scale=1.0))
    with pytest.raises(FileNotFoundError):
        sample(_opts(models, tmp_path / "a", model=str(tmp_path / "nope.pt")))
    with pytest.raises(ValueError, match="batch_size"):
        sample(_opts(models, tmp_path / "a", batch_size=0))
    with pytest.raises(ValueError, match="network_batch must be between 1 and the batch size"):
        sample(_opts(models, tmp_path / "a", batch_size=4, network_batch=8))
    # An output folder with other options is refused, and taken over with overwrite.
    sample(_opts(models, tmp_path / "o", num_samples=2, batch_size=2, steps="1"))
    (tmp_path / "o" / "mine.txt").write_text("not the sampler's")
    with pytest.raises(ValueError, match="other options.*--overwrite"):
        sample(_opts(models, tmp_path / "o", num_samples=2, batch_size=2, steps="1", seed=1))
    path = sample(_opts(models, tmp_path / "o", num_samples=2, batch_size=2, steps="1", seed=1, overwrite=True))
    assert json.loads((tmp_path / "o" / "options.json").read_text())["seed"] == 1 and path.is_file()
    assert (tmp_path / "o" / "mine.txt").is_file()
    # A classifier noised with another schedule: a warning, then sampling.
    with pytest.warns(UserWarning, match="cosine schedule"):
        sample(_opts(models, tmp_path / "w", classifier=models["clf_cos"], num_samples=2, batch_size=2, steps="1"))


def test_labels_per_index():
    uniform = Labels.build("uniform", 10, 1000, seed=3)
    assert np.array_equal(uniform(range(5)), Labels.build("uniform", 50000, 1000, seed=3)(range(5)))
    assert not np.array_equal(uniform(range(10)), Labels.build("uniform", 10, 1000, seed=4)(range(10)))
    balanced = Labels.build("balanced", 40, 10, seed=0)
    values = balanced(range(40))
    assert np.bincount(values, minlength=10).tolist() == [4] * 10
    assert not np.array_equal(values, np.arange(40) % 10)  # shuffled
    assert np.array_equal(balanced([40, 41]), values[:2])  # fill-up indices wrap around
    assert Labels.build(None, 3, None, seed=0)(range(3)).tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="neither the model nor a classifier"):
        Labels.build("balanced", 3, None, seed=0)
    assert len({sample_seed(0, i) for i in range(1000)} | {sample_seed(1, i) for i in range(1000)}) == 2000


def test_cli(models, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli.main(["sample", "--model", models["unet"], "--classifier", models["clf"], "--num-samples", "3",
                     "--batch-size", "2", "--steps", "1", "--labels", "balanced", "--out", str(out), "--no-progress"])
    assert code == 0
    images, labels = _arrays(out / "samples_3x16x16x3.npz")
    assert images.shape == (3, 16, 16, 3) and len(set(labels.tolist())) == 3
    code = cli.main(["sample", "--model", models["unet"], "--num-samples", "3", "--steps", "1", "--out", str(out)])
    assert code == 2
    assert "other options" in capsys.readouterr().err


# ---------------------------------------------------------------------------- DPM-Solver++ in the job
def test_dpm_solver_file_matches_the_core_loop_and_its_options_enter_the_hash(models, tmp_path):
    """`--steps dpm++2m-N`: the first batch equals the core's dpm_solver_sample_loop started from the
    same per-index x_T (the one every sampler draws first); order, skip type and thresholding are
    recorded and each changes the options hash; a folder of other DPM options is refused."""
    kw = dict(classifier=models["clf"], classifier_scale=4.0, labels="balanced")
    path = sample(_opts(models, tmp_path / "dpm", steps="dpm++2m-3", **kw))
    images, labels = _arrays(path)
    options = json.loads((tmp_path / "dpm" / "options.json").read_text())
    assert (options["sampler"], options["num_steps"], options["skip_type"], options["thresholding"]) == \
        ("dpm++", 3, "time_uniform", False)
    assert options["content"]["dpm_solver"] == {"order": 2, "evaluations": 3, "skip_type": "time_uniform",
                                                "thresholding": False, "start_timestep": 999.0}

    unet, preset = load_model(models["unet"])
    clf, _ = load_model(models["clf"])
    diffusion = preset.diffusion.build()  # unspaced
    x_t = PerSampleNoise([sample_seed(0, i) for i in range(4)]).initial((4, 3, 16, 16))
    out = diffusion.dpm_solver_sample_loop(unet, x_t.shape, noise=x_t, cond_fn=classifier_cond_fn(clf, 4.0),
                                           model_kwargs={"y": torch.from_numpy(labels[:4])}, steps=3, order=2)
    np.testing.assert_array_equal(sf.to_uint8(out).numpy(), images[:4])

    hashes = {options["options_hash"]}
    for name, extra in (("order1", dict(steps="dpm++1-3")), ("logsnr", dict(steps="dpm++2m-3", skip_type="logSNR")),
                        ("quad", dict(steps="dpm++2m-3", skip_type="time_quadratic")),
                        ("thr", dict(steps="dpm++2m-3", thresholding=True)),
                        ("start", dict(steps="dpm++2m-3", solver_start=960.0))):
        sample(_opts(models, tmp_path / name, **kw, **extra))
        hashes.add(json.loads((tmp_path / name / "options.json").read_text())["options_hash"])
    assert len(hashes) == 6
    with pytest.raises(ValueError, match="other options.*--overwrite"):
        sample(_opts(models, tmp_path / "dpm", steps="dpm++2m-3", skip_type="logSNR", **kw))
    ddpm = sample(_opts(models, tmp_path / "ddpm", steps="3", **kw))
    assert "dpm_solver" not in json.loads((ddpm.parent / "options.json").read_text())["content"]


def test_dpm_solver_bitwise_the_same_for_every_batch_size_with_a_fixed_network_batch(models, tmp_path):
    """The solver's model and classifier calls (and thresholding) run in chunks of --network-batch rows
    too: every batch size and shard layout gives the same bytes."""
    kw = dict(classifier=models["clf"], classifier_scale=4.0, steps="dpm++2m-3", thresholding=True,
              labels="balanced", num_samples=9, network_batch=2)
    ref = _arrays(sample(_opts(models, tmp_path / "b2", batch_size=2, shard_size=4, **kw)))
    for b, s in ((3, 9), (9, 2)):
        got = _arrays(sample(_opts(models, tmp_path / f"b{b}s{s}", batch_size=b, shard_size=s, **kw)))
        np.testing.assert_array_equal(got[0], ref[0], err_msg=f"batch size {b}, shard size {s}")
        np.testing.assert_array_equal(got[1], ref[1])


def test_dpm_solver_refusals(models, tmp_path):
    for extra, message in (
            (dict(steps="3", skip_type="logSNR"), "apply to DPM-Solver\\+\\+ only"),
            (dict(steps="ddim3", thresholding=True), "apply to DPM-Solver\\+\\+ only"),
            (dict(steps="3", solver_start=960.0), "apply to DPM-Solver\\+\\+ only"),
            (dict(steps="dpm++2m-3", solver_start=1000.0), "start_timestep must be an original timestep"),
            (dict(steps="dpm++2m-3", sampler="ddpm"), "are DPM-Solver\\+\\+ steps but the sampler is 'ddpm'"),
            (dict(steps="20", sampler="dpm++"), "not a DPM-Solver\\+\\+ steps string.*dpm\\+\\+2m-N"),
            (dict(steps="dpm++3m-20"), "not a DPM-Solver\\+\\+ steps string"),
            (dict(steps="dpm++2m-0"), "not a DPM-Solver\\+\\+ steps string"),
            (dict(steps="dpm++2m-3", eta=0.5), "eta=0.5 only applies to DDIM"),
            (dict(steps="dpm++2m-3", skip_type="logsnr"), "skip_type must be one of"),
            (dict(steps="dpm++2m-2000"), "more than the model's 1000 training steps")):
        with pytest.raises(ValueError, match=message):
            sample(_opts(models, tmp_path / "x", **extra))


def test_guidance_intervals_through_the_cli(models, tmp_path):
    """`--classifier-scale S@LO:HI`: an interval holding every step's time is the plain scale, one holding
    none is no guidance (the classifier runs and its gradient is multiplied by 0), one in between is
    neither; the same for the DPM-Solver's fractional times. `--cfg-scale W@LO:HI` too."""
    def run(name, *extra):
        out = tmp_path / name
        assert cli.main(["sample", "--model", models["unet"], "--classifier", models["clf"], "--num-samples", "4",
                         "--batch-size", "4", "--out", str(out), "--no-progress", "--grid-size", "0", *extra]) == 0
        return _arrays(out / "samples_4x16x16x3.npz")[0], json.loads((out / "options.json").read_text())

    for steps in ("3", "dpm++2m-3"):
        full, _ = run(f"full{steps}", "--steps", steps, "--classifier-scale", "8")
        inside, options = run(f"in{steps}", "--steps", steps, "--classifier-scale", "8@0:999")
        outside, _ = run(f"out{steps}", "--steps", steps, "--classifier-scale", "8@1500:2000")
        off, _ = run(f"off{steps}", "--steps", steps, "--classifier-scale", "0")
        part, _ = run(f"part{steps}", "--steps", steps, "--classifier-scale", "8@0:800")
        assert options["classifier_scale"] == "8@0:999"
        np.testing.assert_array_equal(inside, full)
        np.testing.assert_array_equal(outside, off)
        assert not np.array_equal(part, full) and not np.array_equal(part, off)
    out = tmp_path / "cfg"
    assert cli.main(["sample", "--model", models["cfg"], "--cfg-scale", "3@500:999", "--num-samples", "2",
                     "--batch-size", "2", "--steps", "dpm++2m-2", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "options.json").read_text())["content"]["cfg_scale"] == "3@500:999"
