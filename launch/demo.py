"""`adm demo`: the whole pipeline on 5,000 real MNIST digits, in minutes on a CPU.

The demo is a pipeline definition (`demo_pipeline`) run by the same runner as `adm pipeline --local`
(launch.pipeline.run_local): every stage is the real `adm` command, in its own process, logged in
OUT/logs/STAGE.log, recorded in OUT/pipeline.json:

  dataset      adm make-digits: the digits as an ImageNet-style folder of class folders
  shards       adm prepare-imagenet --allow-custom-classes
  unet         adm train --preset demo-unet: an UNCONDITIONAL ADM UNet
  classifier   adm train-classifier --preset demo-classifier
  domain       adm evaluate --train-classifier: an independent classifier of clean images; it gives
               the class accuracy of samples and the features for FID, precision and recall
               ("FID with domain features")
  reference    adm make-reference --no-stats: real images to compare with
  sample-sX    adm sample --classifier-scale X, for every scale X
  eval-sX      adm evaluate --features classifier:...
  report       adm report: report.html / .md / .json, plots of the metrics against the scale,
               per-class sample grids per scale

With `steps_sweep` (`adm demo --steps-sweep`), also the quality against sampling steps:

  sweep-sample-T-sX   adm sample FLAGS --classifier-scale X for every FLAGS of `sweep_samplers`
                      (DDPM-250, DDIM-25, DDIM-15, DPM-Solver++(2M) at 10, 15, 20, 25 evaluations
                      from index 960, and at 15, 20 from its default start) and every X of
                      `sweep_scales`
  sweep-eval-T-sX     adm evaluate ... --standard-errors (delete-half jackknife, paired across samplers)
  report-steps        adm report: OUT/report_steps/ (metrics +- standard errors against evaluations)

and shows the paper's point: classifier guidance trades diversity (recall) for class fidelity
(accuracy, precision; the 8 px `--quick` run shows accuracy and FID only, see docs/demo.md). A rerun
skips the stages that completed with the same command (and training and sampling resume inside a
stage).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time
from pathlib import Path
from typing import Callable

from launch.pipeline import Pipeline, build_pipeline, run_local
from runtime.files import atomic_write_json
from runtime.names import parse_error_line

SETTINGS_FILE = "demo.json"


# The UNet is demo-unet with 64 base channels: with 32, every GroupNorm group is a single channel,
# so the network cannot see (or predict) a channel's mean and its samples come out with colour
# casts. No random flips: a mirrored digit is not a digit. Items are `adm train --set` options.
# A cosine learning-rate decay (with a short EMA) gave the quality of 25% more constant-rate steps.
_UNET_SET = ("batch_size=32", "lr=1e-3", "lr_schedule=cosine", "ema_rates=[0.99]", "random_flip=false",
             "model.model_channels=64")
_CLASSIFIER_SET = ("batch_size=64", "lr=2e-3", "random_flip=false")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run. `quick()` and `full()` are the two tuned sets; `--set` edits a field.

    `unet_set` / `classifier_set` are `adm train` / `adm train-classifier` `--set` items (preset
    overrides as `model.X=...`); `image_size`, the steps and the seed are added to them.
    """

    image_size: int = 16  # side the models work at (the digits are stored at 32 px; ADM's centre crop resizes)
    per_class: int | None = None  # digits per class used (None: all 500)
    unet_preset: str = "demo-unet"
    unet_set: tuple[str, ...] = _UNET_SET + ("model.channel_mult=[1,1,2]", "model.attention_resolutions=[4]")
    unet_steps: int = 1200
    classifier_preset: str = "demo-classifier"
    classifier_set: tuple[str, ...] = _CLASSIFIER_SET
    classifier_steps: int = 1000
    domain_epochs: int = 4
    num_samples: int = 500  # per guidance scale
    ref_samples: int = 1000  # real images in the reference batch
    sample_steps: str = "25"  # 25 respaced ancestral (DDPM) steps; DDIM-25 gave blotchier digits here
    # Every index has its own noise, so the batch changes the speed, not the digits (the uint8
    # samples came out identical at 50 and 250 here); 250 sampled 26% faster than 50 at 16 px and
    # 40% faster at 8 px on two cores.
    sample_batch: int = 250
    # 16 and 32: with ten classes p(y|x) saturates sooner than with ImageNet's thousand, and 25
    # respaced steps give the gradient ~20-40% less weight than 250 do, so the paper's trade-off
    # (its unconditional model: scale 10) shows here at 16-32. At 64 precision fell again.
    scales: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    seed: int = 0
    # The steps sweep (--steps-sweep): the samplers, scales, samples per point and the half-samples
    # of the standard errors.
    # Each entry: the `adm sample` flags of one sampler. DPM-Solver++ twice: from index 960, where
    # DDIM-25's respacing starts (a comparison of solvers from one noise level), and from its default
    # start, lambda = -5.1 (index 995 for this cosine schedule), which guidance at scales 4-16 does
    # not survive on these models (docs/demo.md).
    # DDPM-250, the slow one, last: the others' results come first.
    sweep_samplers: tuple[str, ...] = (
        "--steps ddim25", "--steps ddim15",
        *(f"--steps dpm++2m-{n} --solver-start 960" for n in (10, 15, 20, 25)),
        "--steps dpm++2m-15", "--steps dpm++2m-20", "--steps 250")
    sweep_scales: tuple[float, ...] = (4.0, 16.0)
    sweep_samples: int = 500
    sweep_standard_errors: int = 50

    @classmethod
    def quick(cls) -> "DemoSettings":
        """Under 4 minutes on two CPU cores (what CI runs): 8 px digits, shorter training."""
        return cls(image_size=8,
                   unet_set=_UNET_SET + ("model.channel_mult=[1,2]", "model.attention_resolutions=[4]"),
                   unet_steps=600,
                   classifier_set=_CLASSIFIER_SET + ("model.channel_mult=[1,2]", "model.attention_resolutions=[4]"),
                   classifier_steps=500, domain_epochs=3, num_samples=250, ref_samples=500)

    @classmethod
    def full(cls) -> "DemoSettings":
        """Under 15 minutes on two CPU cores: 16 px digits."""
        return cls()

    def replace(self, items: list[str]) -> "DemoSettings":
        """Apply `key=value` edits (values parsed as YAML: numbers, lists, null)."""
        import yaml

        fields = {f.name: f for f in dataclasses.fields(self)}
        changes = {}
        for item in items:
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep or key not in fields:
                raise ValueError(f"--set expects KEY=VALUE with KEY one of {', '.join(fields)}; got {item!r}")
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise ValueError(f"--set {item!r}: not a YAML value ({parse_error_line(err)})") from None
            if key in ("unet_set", "classifier_set"):
                if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
                    raise ValueError(f"{key} takes a list of KEY=VALUE training options, e.g. {key}=[lr=1e-4, batch_size=16]")
                value = tuple(value)
            elif key in ("scales", "sweep_scales"):
                value = tuple(float(v) for v in (value if isinstance(value, list) else [value]))
            elif key == "sweep_samplers":
                value = tuple(str(v) for v in (value if isinstance(value, list) else [value]))
            changes[key] = value
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def scale_name(scale: float) -> str:
    """Folder-safe name of a guidance scale: 0 -> 's0', 0.5 -> 's0.5'."""
    return f"s{scale:g}"


def sampler_name(flags: str) -> str:
    """Folder-safe name of a sweep entry: "--steps 250" -> "ddpm250", "--steps dpm++2m-15
    --solver-start 960" -> "dpm2m15-solverstart960"."""
    words = shlex.split(flags)
    if "--steps" not in words or words.index("--steps") + 1 >= len(words):
        raise ValueError(f"sweep entry {flags!r} has no --steps STEPS")
    at = words.index("--steps")
    steps = words[at + 1]
    rest = words[:at] + words[at + 2:]
    name = f"ddpm{steps}" if steps.isdigit() else "".join(c for c in steps if c.isalnum())
    extra = "".join(c for c in "".join(rest) if c.isalnum())
    return f"{name}-{extra}" if extra else name


def demo_pipeline(out: str | os.PathLike, s: DemoSettings, steps_sweep: bool = False) -> Pipeline:
    """The demo as a pipeline definition (the mapping a pipeline YAML file would hold), checked like one;
    `steps_sweep` adds the sweep over samplers and steps (steps_sweep_stages)."""
    out = Path(out).absolute()
    shards, unet, clf = out / "shards", out / "runs" / "unet", out / "runs" / "classifier"
    domain, reference = out / "domain_classifier.pt", out / "reference.npz"

    def train(command: str, run_dir: Path, preset: str, items: tuple[str, ...], steps: int) -> dict:
        sets = [f"model.image_size={s.image_size}", *items, f"total_steps={steps}", f"seed={s.seed}",
                "num_workers=0",  # two cores: decoding small PNGs in-process beats worker processes
                f"log_every={max(1, steps // 10)}", f"save_every={max(1, steps // 3)}", "keep_last=1"]
        return {"command": command, "after": ["shards"],
                "args": ["--run-dir", str(run_dir), "--preset", preset, "--data", str(shards), "--set", *sets]}

    stages: dict[str, dict] = {
        "dataset": {"command": "make-digits",
                    "args": [str(out / "digits")] + ([] if s.per_class is None else ["--per-class", str(s.per_class)])},
        # Ten shards, so the loader has something to shuffle between.
        "shards": {"command": "prepare-imagenet", "after": ["dataset"],
                   "args": [str(out / "digits"), str(shards), "--allow-custom-classes", "--samples-per-shard",
                            str(s.per_class or 500), "--workers", "1", "--no-progress"]},
        "unet": train("train", unet, s.unet_preset, s.unet_set, s.unet_steps),
        "classifier": train("train-classifier", clf, s.classifier_preset, s.classifier_set, s.classifier_steps),
        "domain": {"command": "evaluate", "after": ["shards"],
                   "args": ["--train-classifier", str(shards), "--out", str(domain), "--image-size",
                            str(s.image_size), "--epochs", str(s.domain_epochs), "--seed", str(s.seed)]},
        # No Inception weights here: the domain features are computed at evaluation time.
        "reference": {"command": "make-reference", "after": ["shards"],
                      "args": [str(shards), "--size", str(s.image_size), "--num-images", str(s.ref_samples),
                               "--no-stats", "--seed", str(s.seed), "--out", str(reference)]},
    }
    for x in s.scales:
        folder = out / "samples" / scale_name(x)
        stages[f"sample-{scale_name(x)}"] = {
            "command": "sample", "after": ["unet", "classifier"],
            "args": ["--model", str(unet), "--classifier", str(clf), "--classifier-scale", f"{x:g}",
                     "--num-samples", str(s.num_samples), "--steps", s.sample_steps, "--labels", "balanced",
                     "--seed", str(s.seed), "--batch-size", str(s.sample_batch),
                     "--shard-size", str(s.sample_batch),  # the unit of resume
                     "--grid-size", "0", "--no-progress", "--out", str(folder)]}
    for x in s.scales:
        samples = out / "samples" / scale_name(x) / f"samples_{s.num_samples}x{s.image_size}x{s.image_size}x3.npz"
        stages[f"eval-{scale_name(x)}"] = {
            "command": "evaluate", "after": [f"sample-{scale_name(x)}", "domain", "reference"],
            "args": [str(reference), str(samples), "--features", f"classifier:{domain}", "--out",
                     str(_metrics_dir(out, x))]}
    stages["report"] = {"command": "report", "after": [f"eval-{scale_name(x)}" for x in s.scales],
                        "args": [*(str(_metrics_dir(out, x) / "metrics.json") for x in s.scales), "--out",
                                 str(out / "report"), "--title", "adm demo: classifier guidance on MNIST digits"]}
    if steps_sweep:
        stages.update(steps_sweep_stages(out, s))
    return build_pipeline({"name": "demo", "out": str(out), "stages": stages}, "adm demo")


def steps_sweep_stages(out: Path, s: DemoSettings) -> dict:
    """Sample, evaluate (with standard errors) and report every (steps, scale) of the steps sweep.

    Every sampler gets the same seed, labels and sample count, so index i starts from the same x_T
    with the same label in every run and the differences between samplers are paired.
    """
    stages: dict[str, dict] = {}
    metrics = []
    for flags in s.sweep_samplers:
        for x in s.sweep_scales:
            name = f"{sampler_name(flags)}-{scale_name(x)}"
            folder = out / "steps_sweep" / "samples" / name
            stages[f"sweep-sample-{name}"] = {
                "command": "sample", "after": ["unet", "classifier"],
                "args": ["--model", str(out / "runs" / "unet"), "--classifier", str(out / "runs" / "classifier"),
                         "--classifier-scale", f"{x:g}", "--num-samples", str(s.sweep_samples), *shlex.split(flags),
                         "--labels", "balanced", "--seed", str(s.seed), "--batch-size", str(s.sample_batch),
                         "--shard-size", str(s.sample_batch), "--grid-size", "0", "--no-progress", "--out", str(folder)]}
            samples = folder / f"samples_{s.sweep_samples}x{s.image_size}x{s.image_size}x3.npz"
            result = out / "steps_sweep" / "metrics" / name
            stages[f"sweep-eval-{name}"] = {
                "command": "evaluate", "after": [f"sweep-sample-{name}", "domain", "reference"],
                "args": [str(out / "reference.npz"), str(samples), "--features",
                         f"classifier:{out / 'domain_classifier.pt'}", "--standard-errors",
                         str(s.sweep_standard_errors), "--out", str(result)]}
            metrics.append((f"sweep-eval-{name}", result / "metrics.json"))
    stages["report-steps"] = {"command": "report", "after": [stage for stage, _ in metrics],
                              "args": [*(str(path) for _, path in metrics), "--out", str(out / "report_steps"),
                                       "--title", "adm demo: quality against sampling steps"]}
    return stages


def _metrics_dir(out: Path, scale: float) -> Path:
    return out / "metrics" / f"classifier_scale_{scale:g}"


def check_settings(out: str | os.PathLike, settings: DemoSettings) -> None:
    """Refuse a folder made with other settings (its finished stages would not match); record them.

    A folder of an earlier version lacks the settings added since; at their defaults they change
    none of its stages, so it is accepted and its record completed.
    """
    out = Path(out)
    path = out / SETTINGS_FILE
    mine = settings.to_dict()
    saved = json.loads(path.read_text()) if path.is_file() else None
    if saved is not None:
        defaults = DemoSettings().to_dict()
        completed = {**{k: mine[k] for k in mine if k not in saved and mine[k] == defaults[k]}, **saved}
        if completed != mine:
            diff = sorted(k for k in set(completed) | set(mine) if completed.get(k) != mine.get(k))
            raise ValueError(f"{out} holds a demo run with other settings ({', '.join(diff)} differ, "
                             f"e.g. --quick vs the full run); use another --out or delete {out}")
    if saved != mine:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, mine)


def check_guidance(sweep: list[dict], chance: float = 0.1, precision_recall: bool = True) -> list[str]:
    """What fails of the guidance effect the demo must show; empty: guidance works.

    Class accuracy about chance at scale 0 (< 2.5x chance: unguided samples carry labels drawn
    independently of the image), far above it at the largest scale (> 0.6), rising with the scale
    (0.03 slack between neighbouring scales for sampling noise), and a lower FID at the largest
    scale than at scale 0.

    With `precision_recall` (the full run), also the paper's trade-off: precision at the largest
    scale above scale 0's and recall at the largest scale below scale 0's, both without slack. Both
    compare with scale 0, as the paper's Table 4 compares guided with unguided sampling; recall is
    not compared with its peak because a rise at small scales is real here (the unconditional UNet
    under-produces some digits, e.g. about 1% ones against 10% of real digits, and balanced labels
    restore them, see docs/demo.md) and a fall from the peak alone would not show a loss against
    unguided sampling. `--quick` passes False: at 8 px and 250 samples per scale the trade-off is
    not there to check (precision at scale 32 is below scale 0's in the domain features and does not
    rise in any other feature space tried; docs/demo.md has the measurements).
    """
    sweep = sorted(sweep, key=lambda r: r["scale"])
    if len(sweep) < 2 or sweep[0]["scale"] != 0:
        return [f"need scale 0 and at least one larger scale, got {[r['scale'] for r in sweep]}"]
    acc = [r["class_accuracy"] for r in sweep]
    first, last = sweep[0], sweep[-1]
    fails = []
    if acc[0] >= 2.5 * chance:
        fails.append(f"class accuracy at scale 0 is {acc[0]:.3f}, not about chance ({chance:g})")
    if acc[-1] <= 0.6:
        fails.append(f"class accuracy at scale {last['scale']:g} is {acc[-1]:.3f}, not far above chance")
    if any(b < a - 0.03 for a, b in zip(acc, acc[1:])):
        fails.append(f"class accuracy does not rise with the scale: {[round(a, 3) for a in acc]}")
    if not last["fid"] < first["fid"]:
        fails.append(f"FID does not improve: {first['fid']:.2f} -> {last['fid']:.2f}")
    if precision_recall:
        if not last["precision"] > first["precision"]:
            fails.append(f"precision does not rise: {first['precision']:.3f} at scale 0, "
                         f"{last['precision']:.3f} at scale {last['scale']:g}")
        if not last["recall"] < first["recall"]:
            fails.append(f"recall does not fall: {first['recall']:.3f} at scale 0, "
                         f"{last['recall']:.3f} at scale {last['scale']:g}")
    return fails


def summary_table(report: dict) -> str:
    """The sweep as a fixed-width text table."""
    lines = [f"{'scale':>6} {'class acc':>9} {'FID':>8} {'precision':>9} {'recall':>7}"]
    for r in report["guidance_sweep"]:
        lines.append(f"{r['scale']:>6g} {r['class_accuracy']:>9.3f} {r['fid']:>8.2f} {r['precision']:>9.3f} "
                     f"{r['recall']:>7.3f}")
    return "\n".join(lines)


# The questions of the steps sweep: DPM-Solver++(2M) with this many evaluations against
# the sampler it should match (for every DPM-Solver++(2M) variant in the sweep).
STEPS_GOALS = ((15, "DDIM-25"), (20, "DDPM-250"))


def steps_comparisons(steps_report: dict) -> list[dict]:
    """For each STEPS_GOALS pair and scale: the difference in class accuracy and FID, its paired
    standard error, the baseline's own standard error, and the verdict: "within" (|difference| <=
    the baseline's standard error), else "better" or "worse" (higher accuracy, lower FID is better)."""
    rows = []
    for sweep in steps_report.get("steps_sweeps", []):
        points = {(p["sampler"], p["scale"]): p for p in sweep["points"]}
        for evals, base in STEPS_GOALS:
            for (sampler, scale), point in points.items():
                baseline = points.get((base, scale))
                if not (sampler.startswith("DPM-Solver++(2M)") and point["evaluations"] == evals) or baseline is None:
                    continue
                for metric in ("class_accuracy", "fid"):
                    delta, paired = point["diffs"][base][metric]
                    base_se = baseline[f"{metric}_se"]
                    if base_se is not None and abs(delta) <= base_se:
                        verdict = "within"
                    else:
                        verdict = "better" if (delta > 0) == (metric == "class_accuracy") else "worse"
                    rows.append({"fast": sampler, "baseline": base, "scale": scale, "metric": metric, "delta": delta,
                                 "paired_se": paired, "baseline_se": base_se, "verdict": verdict})
    return rows


def steps_summary(steps_report: dict) -> str:
    """The steps sweep as a fixed-width table (metrics +- standard error) and the STEPS_GOALS answers."""
    def pm(p, key, digits):
        se = p.get(f"{key}_se")
        return f"{p[key]:.{digits}f}" + (f"±{se:.{digits}f}" if se is not None else "")

    lines = [f"{'sampler':<24}{'evals':>6}{'scale':>6} {'class acc':>12} {'FID':>11} {'precision':>12} {'recall':>12}"]
    for sweep in steps_report.get("steps_sweeps", []):
        for p in sweep["points"]:
            lines.append(f"{p['sampler']:<24}{p['evaluations']:>6}{p['scale']:>6} {pm(p, 'class_accuracy', 3):>12} "
                         f"{pm(p, 'fid', 2):>11} {pm(p, 'precision', 3):>12} {pm(p, 'recall', 3):>12}")
    lines.append("")
    for r in steps_comparisons(steps_report):
        name = "class acc" if r["metric"] == "class_accuracy" else "FID"
        digits = 3 if r["metric"] == "class_accuracy" else 2
        paired = "–" if r["paired_se"] is None else f"{r['paired_se']:.{digits}f}"
        base_se = "–" if r["baseline_se"] is None else f"{r['baseline_se']:.{digits}f}"
        lines.append(f"scale {r['scale']}: {r['fast']} - {r['baseline']}: {name} {r['delta']:+.{digits}f} "
                     f"(paired SE {paired}; {r['baseline']}'s SE {base_se}: "
                     f"{'within it' if r['verdict'] == 'within' else r['verdict']})")
    return "\n".join(lines)


def run_demo(out: str | os.PathLike = "demo_out", quick: bool = False, overrides: list[str] | None = None,
             threads: int | None = None, log: Callable[[str], None] = print, steps_sweep: bool = False) -> dict:
    """Run (or finish) the demo in `out`; returns report.json's content plus `stage_seconds`, and with
    `steps_sweep` the steps report's content as `steps_report`.

    `threads`: torch intra-op threads of every stage (default: the CPU cores this process may use).
    Raises launch.pipeline.StageFailed naming the stage and its log when a stage fails.
    """
    settings = DemoSettings.quick() if quick else DemoSettings.full()
    if overrides:
        settings = settings.replace(overrides)
    check_settings(out, settings)
    pipeline = demo_pipeline(out, settings, steps_sweep=steps_sweep)
    env = {"OMP_NUM_THREADS": str(threads or len(os.sched_getaffinity(0))),
           # Waiting OpenMP threads sleep instead of spinning: on a shared machine (CI, other jobs) a
           # spinning thread whose partner was descheduled made sampling 20x slower here.
           "OMP_WAIT_POLICY": "PASSIVE"}
    t0 = time.perf_counter()
    seconds = run_local(pipeline, echo=log, env=env)
    report = json.loads((pipeline.out / "report" / "report.json").read_text())
    if steps_sweep:
        report["steps_report"] = json.loads((pipeline.out / "report_steps" / "report.json").read_text())
    report["stage_seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    report["wall_seconds_this_run"] = round(time.perf_counter() - t0, 1)
    return report
