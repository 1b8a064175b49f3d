"""`adm demo`: the whole pipeline on 5,000 real MNIST digits, in minutes on a CPU.

It runs the real stages, in order, each through the same library call its `adm` command makes:

  dataset      data.demo_dataset: the digits as an ImageNet-style folder of class folders
  shards       data.prepare.prepare_imagenet (`adm prepare-imagenet --allow-custom-classes`)
  unet         launch.train.train (`adm train --preset demo-unet`): an UNCONDITIONAL ADM UNet
  classifier   launch.train_classifier.train_classifier (`adm train-classifier --preset demo-classifier`)
  domain       evaluation.domain_classifier.train_domain_classifier: an independent classifier of
               clean images; it gives the class accuracy of samples and the features for FID,
               precision and recall ("FID with domain features")
  reference    evaluation.reference.make_reference (`adm make-reference`): real images to compare with
  sample-sX    launch.sampler.sample (`adm sample --classifier-scale X`) for every scale X
  eval-sX      evaluation.evaluate.evaluate (`adm evaluate --features classifier:...`)
  report       evaluation.report.build_report (`adm report`): report.html / .md / .json, plots of
               the metrics against the scale, per-class sample grids per scale

and shows the paper's point: classifier guidance trades diversity (recall) for class fidelity
(accuracy, precision; the 8 px `--quick` run shows accuracy and FID only, see docs/demo.md). Every
stage leaves a marker in OUT/stages/ when it is done, so a rerun skips finished stages (and the
training and sampling jobs themselves resume inside a stage).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from data.fileio import atomic_write_json

STAGE_DIR = "stages"
SETTINGS_FILE = "demo.json"


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------
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
            value = yaml.safe_load(text)
            if key in ("unet_set", "classifier_set"):
                if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
                    raise ValueError(f"{key} takes a list of KEY=VALUE training options, e.g. {key}=[lr=1e-4, batch_size=16]")
                value = tuple(value)
            elif key == "scales":
                value = tuple(float(v) for v in (value if isinstance(value, list) else [value]))
            changes[key] = value
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def scale_name(scale: float) -> str:
    """Folder-safe name of a guidance scale: 0 -> 's0', 0.5 -> 's0.5'."""
    return f"s{scale:g}"


class Demo:
    """One demo run in folder `out` (see the module docstring for the stages)."""

    def __init__(self, out: str | os.PathLike, settings: DemoSettings, log: Callable[[str], None] = print):
        self.out = Path(out)
        self.s = settings
        self.log = log
        self.stage_times: dict[str, dict] = {}
        self.paths = {
            "digits": self.out / "digits",
            "shards": self.out / "shards",
            "unet": self.out / "runs" / "unet",
            "classifier": self.out / "runs" / "classifier",
            "domain": self.out / "domain_classifier.pt",
            "reference": self.out / "reference.npz",
            "samples": self.out / "samples",
            "metrics": self.out / "metrics",
            "report": self.out / "report",
        }

    # -- bookkeeping ----------------------------------------------------------------------------
    def _check_settings(self) -> None:
        """Refuse a folder made with other settings (its finished stages would not match)."""
        path = self.out / SETTINGS_FILE
        mine = self.s.to_dict()
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved != mine:
                diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
                raise ValueError(f"{self.out} holds a demo run with other settings ({', '.join(diff)} differ, "
                                 f"e.g. --quick vs the full run); use another --out or delete {self.out}")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, mine)

    def _stage(self, name: str, title: str, fn: Callable[[], dict | None]) -> dict:
        """Run stage `name` unless its marker says it is done; record and return its info."""
        marker = self.out / STAGE_DIR / f"{name}.json"
        if marker.is_file():
            info = json.loads(marker.read_text())
            info["skipped"] = True
            self.stage_times[name] = info
            self.log(f"[demo] {name:<12} done before ({info['seconds']:.0f} s), skipped")
            return info
        self.log(f"[demo] {name:<12} {title} ...")
        t0 = time.perf_counter()
        result = fn() or {}
        info = {"seconds": round(time.perf_counter() - t0, 2), **result}
        atomic_write_json(marker, info)
        info["skipped"] = False
        self.stage_times[name] = info
        self.log(f"[demo] {name:<12} done in {info['seconds']:.0f} s")
        return info

    # -- stages -----------------------------------------------------------------------------------
    def dataset(self) -> dict:
        from data.demo_dataset import write_digit_folders

        summary = write_digit_folders(self.paths["digits"], per_class=self.s.per_class)
        return {"num_images": summary["num_images"]}

    def shards(self) -> dict:
        from data.prepare import prepare_imagenet

        # Ten shards, so the loader has something to shuffle between.
        per_shard = max(1, (self.s.per_class or 500))
        manifest = prepare_imagenet(self.paths["digits"], self.paths["shards"], allow_custom_classes=True,
                                    samples_per_shard=per_shard, workers=1)
        return {"num_samples": manifest["num_samples"], "num_shards": len(manifest["shards"])}

    def _train(self, kind: str, run_dir: Path, preset: str, items: tuple[str, ...], steps: int) -> dict:
        """The `adm train` / `adm train-classifier` job, configured as its command line would be."""
        from launch.config import build_config

        sets = [f"model.image_size={self.s.image_size}", *items, f"total_steps={steps}", f"seed={self.s.seed}",
                "num_workers=0",  # two cores: decoding small PNGs in-process beats worker processes
                f"log_every={max(1, steps // 10)}", f"save_every={max(1, steps // 3)}", "keep_last=1"]
        command = (f"adm {'train-classifier' if kind == 'classifier' else 'train'} --run-dir {run_dir} "
                   f"--preset {preset} --data {self.paths['shards']} --set " + " ".join(sets))
        self.log(f"    {command}")
        cfg = build_config(kind, sets=sets, preset=preset, data=str(self.paths["shards"]))
        if kind == "classifier":
            from launch.train_classifier import train_classifier as job
        else:
            from launch.train import train as job
        job(cfg, run_dir)
        return {"steps": steps, "command": command}

    def unet(self) -> dict:
        s = self.s
        return self._train("diffusion", self.paths["unet"], s.unet_preset, s.unet_set, s.unet_steps)

    def classifier(self) -> dict:
        s = self.s
        return self._train("classifier", self.paths["classifier"], s.classifier_preset, s.classifier_set,
                           s.classifier_steps)

    def _model_size(self) -> int:
        return self.s.image_size

    def domain(self) -> dict:
        from evaluation.domain_classifier import train_domain_classifier

        _, info = train_domain_classifier(str(self.paths["shards"]), self.paths["domain"],
                                          image_size=self._model_size(), epochs=self.s.domain_epochs,
                                          seed=self.s.seed, log=lambda line: self.log(f"    {line}"))
        return {"val_accuracy": info["val_accuracy"], "train_accuracy": info["train_accuracy"]}

    def reference(self) -> dict:
        """Real images to compare with (`adm make-reference --no-stats`: the domain features are
        computed at evaluation time; there are no Inception weights here)."""
        from evaluation.reference import make_reference

        summary = make_reference(str(self.paths["shards"]), self.paths["reference"], self._model_size(),
                                 num_images=self.s.ref_samples, stats=False, seed=self.s.seed,
                                 log=lambda line: self.log(f"    {line}"))
        return {"num_images": summary["num_images"]}

    def sample(self, scale: float) -> dict:
        """`adm sample --model runs/unet --classifier runs/classifier --classifier-scale X --labels balanced`."""
        import sys

        from launch.sampler import SampleOptions, sample

        s = self.s
        out = self.paths["samples"] / scale_name(scale)
        self.log(f"    adm sample --model {self.paths['unet']} --classifier {self.paths['classifier']} "
                 f"--classifier-scale {scale:g} --num-samples {s.num_samples} --steps {s.sample_steps} "
                 f"--labels balanced --seed {s.seed} --batch-size {s.sample_batch} --out {out}")
        path = sample(SampleOptions(
            model=str(self.paths["unet"]), classifier=str(self.paths["classifier"]), classifier_scale=float(scale),
            num_samples=s.num_samples, batch_size=s.sample_batch, steps=s.sample_steps, labels="balanced",
            seed=s.seed, out=str(out), shard_size=s.sample_batch,  # the unit of resume
            progress=sys.stderr.isatty(), grid_size=0))
        return {"file": str(path.relative_to(self.out))}

    def evaluate(self, scale: float) -> dict:
        """`adm evaluate REF SAMPLES --features classifier:DOMAIN --out metrics/classifier_scale_X`."""
        from evaluation.evaluate import evaluate

        record = evaluate(self.paths["reference"], self.out / self.stage_times[f"sample-{scale_name(scale)}"]["file"],
                          f"classifier:{self.paths['domain']}", out_dir=self._metrics_dir(scale),
                          print_fn=None, progress=False)
        m = record["metrics"]
        return {"scale": float(scale), **{k: m[k] for k in ("class_accuracy", "fid", "precision", "recall")}}

    def _metrics_dir(self, scale: float) -> Path:
        return self.paths["metrics"] / f"classifier_scale_{scale:g}"

    def report(self) -> dict:
        """`adm report metrics/...`: tables, plots against the scale, per-class grids per scale."""
        from evaluation.report import build_report

        report = build_report([self._metrics_dir(x) / "metrics.json" for x in self.s.scales], self.paths["report"],
                              title="adm demo: classifier guidance on MNIST digits")
        return {"guidance_sweep": report["guidance_sweep"]}

    # -- driver -----------------------------------------------------------------------------------
    def run(self) -> dict:
        """Run every stage not done yet; returns the report's JSON (with "guidance_sweep")."""
        self._check_settings()
        t0 = time.perf_counter()
        self._stage("dataset", "5,000 MNIST digits -> class folders", self.dataset)
        self._stage("shards", "prepare-imagenet -> WebDataset shards", self.shards)
        self._stage("unet", f"train the unconditional UNet ({self.s.unet_steps} steps)", self.unet)
        self._stage("classifier", f"train the noisy classifier ({self.s.classifier_steps} steps)", self.classifier)
        self._stage("domain", "train the clean-image classifier (class accuracy, FID features)", self.domain)
        self._stage("reference", "reference batch of real images", self.reference)
        for x in self.s.scales:
            self._stage(f"sample-{scale_name(x)}", f"sample {self.s.num_samples} at classifier scale {x:g}",
                        lambda x=x: self.sample(x))
        for x in self.s.scales:
            self._stage(f"eval-{scale_name(x)}", f"evaluate classifier scale {x:g}", lambda x=x: self.evaluate(x))
        self._stage("report", "report", self.report)
        report = json.loads((self.paths["report"] / "report.json").read_text())
        report["stage_seconds"] = {k: v["seconds"] for k, v in self.stage_times.items()}
        report["wall_seconds_this_run"] = round(time.perf_counter() - t0, 1)
        return report


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
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


def run_demo(out: str | os.PathLike = "demo_out", quick: bool = False, overrides: list[str] | None = None,
             threads: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Run (or finish) the demo in `out`; returns report.json's content.

    `threads`: torch intra-op threads (default: the CPU cores this process may use).
    """
    import sys

    if "torch" not in sys.modules:
        # Waiting OpenMP threads sleep instead of spinning: on a shared machine (CI, other jobs) a
        # spinning thread whose partner was descheduled made sampling 20x slower here; on an idle
        # machine the difference is small. Must be set before torch loads libgomp.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    settings = DemoSettings.quick() if quick else DemoSettings.full()
    if overrides:
        settings = settings.replace(overrides)
    return Demo(out, settings, log).run()
