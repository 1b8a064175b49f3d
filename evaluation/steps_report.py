"""The report's "quality against network evaluations" section: runs that differ in their sampler or
number of steps (and possibly the guidance scale), e.g. DDPM-250, DDIM-25 and DPM-Solver++(2M) at
10-25 evaluations at two scales, as `adm demo --steps-sweep` makes them.

Each point is a run's class accuracy, FID, precision and recall with the standard errors
`adm evaluate --standard-errors` stores; differences between two runs of the same size get the
*paired* standard error from the per-half values (the same sample indices carry the same x_T and
label in every sampler, so most of the sampling noise cancels in a difference).
"""
from __future__ import annotations

import io
import json
from typing import Sequence

METRICS = (("class_accuracy", "Class acc."), ("fid", "FID"), ("precision", "Precision"), ("recall", "Recall"))
# Options that make runs of one steps sweep different samplers rather than different experiments.
STEPS_OPTIONS = ("steps", "sampler", "num_steps", "network_evaluations", "skip_type", "thresholding", "eta",
                 "solver_start")
SCALE_KEYS = ("classifier_scale", "cfg_scale")


def sampler_family(options: dict) -> str:
    """"DDPM", "DDIM", "DPM-Solver++(2M)", "DPM-Solver++(1)"; a DPM-Solver++ run given
    --solver-start T gets "@T", one with --thresholding "+thr", another --skip-type "/TYPE"."""
    kind = options.get("sampler") or "ddpm"
    if kind != "dpm++":
        return kind.upper()
    solver = (options.get("content") or {}).get("dpm_solver") or {}
    name = f"DPM-Solver++({'2M' if solver.get('order', 2) == 2 else solver.get('order')})"
    if options.get("solver_start") is not None:
        name += f"@{float(options['solver_start']):g}"
    if options.get("thresholding"):
        name += "+thr"
    if options.get("skip_type") not in (None, "time_uniform"):
        name += f"/{options['skip_type']}"
    return name


def sampler_label(options: dict) -> str:
    """"DDPM-250", "DDIM-25", "DPM-Solver++(2M)-15", "DPM-Solver++(2M)@960-15": family-evaluations."""
    return f"{sampler_family(options)}-{evaluations(options)}"


def evaluations(options: dict) -> int | None:
    """Network evaluations per sample (model calls; each also runs the classifier when guided)."""
    value = options.get("network_evaluations", options.get("num_steps"))
    return int(value) if value is not None else None


def _scale(options: dict) -> str:
    parts = [f"{options[k]:g}" if isinstance(options[k], (int, float)) else str(options[k])
             for k in SCALE_KEYS if options.get(k) is not None]
    return ", ".join(parts) or "0"


def _scale_order(scale: str) -> tuple:
    """Numbers in numeric order, then schedule strings."""
    try:
        return (0, float(scale), "")
    except ValueError:
        return (1, 0.0, scale)


def find_steps_sweeps(runs: Sequence[dict], ignore: Sequence[str] = ()) -> list[dict]:
    """Groups of runs equal in everything but the sampler, its steps and the guidance scale, holding
    at least two samplers: `{label, runs}` with runs sorted by (scale, sampler kind, evaluations)."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        options = run.get("options") or {}
        if evaluations(options) is None:
            continue
        rest = {k: v for k, v in options.items() if k not in STEPS_OPTIONS and k not in SCALE_KEYS
                and k not in ignore and not k.startswith("_")}
        signature = json.dumps([run.get("features"), run.get("reference"), rest], sort_keys=True, default=str)
        groups.setdefault(signature, []).append(run)
    sweeps = []
    for members in groups.values():
        if len({sampler_label(r["options"]) for r in members}) < 2:
            continue
        members.sort(key=lambda r: (_scale_order(_scale(r["options"])), r["options"].get("sampler") or "ddpm",
                                    evaluations(r["options"])))
        sweeps.append({"label": "quality against network evaluations", "runs": members})
    return sweeps


def _paired(a: dict, b: dict, metric: str) -> float | None:
    from evaluation.standard_errors import paired_standard_error

    ha, hb = a.get("half_samples") or {}, b.get("half_samples") or {}
    same = (ha.get("seed"), ha.get("subsets"), ha.get("size")) == (hb.get("seed"), hb.get("subsets"), hb.get("size"))
    if not same or metric not in ha or metric not in hb or a.get("num_samples") != b.get("num_samples"):
        return None
    return paired_standard_error(ha[metric], hb[metric], int(a["num_samples"]))


def steps_points(sweep: dict) -> list[dict]:
    """report.json rows: sampler, evaluations, scale, each metric and its standard error, and the
    differences to every other run of the same scale (`diffs[label][metric] = [value, paired SE]`)."""
    points = []
    for run in sweep["runs"]:
        o, m, se = run["options"], run["metrics"], run.get("standard_errors") or {}
        point = {"sampler": sampler_label(o), "family": sampler_family(o), "evaluations": evaluations(o),
                 "scale": _scale(o),
                 "num_samples": run.get("num_samples"), "seconds": o.get("seconds_last_run")}
        for key, _ in METRICS:
            point[key], point[f"{key}_se"] = m.get(key), se.get(key)
        point["diffs"] = {}
        for other in sweep["runs"]:
            if other is run or _scale(other["options"]) != point["scale"]:
                continue
            point["diffs"][sampler_label(other["options"])] = {
                key: [m[key] - other["metrics"][key], _paired(run, other, key)]
                for key, _ in METRICS if m.get(key) is not None and other["metrics"].get(key) is not None}
        points.append(point)
    return points


def reference_sampler(points: list[dict]) -> str:
    """The sampler the differences are shown against: the one with the most evaluations (DDPM-250)."""
    return max(points, key=lambda p: p["evaluations"] or 0)["sampler"]


def _pm(value, se, digits: int) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


DIGITS = {"class_accuracy": 3, "fid": 2, "precision": 3, "recall": 3}


def table(points: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: the metrics ± standard error, and the paired difference to the reference sampler."""
    ref = reference_sampler(points)
    header = ["Sampler", "Evals", "Scale"] + [f"{n} ± SE" for _, n in METRICS] + \
             [f"Δ{n} vs {ref}" for k, n in METRICS if k in ("class_accuracy", "fid")]
    rows = []
    for p in points:
        row = [p["sampler"], str(p["evaluations"]), p["scale"]]
        row += [_pm(p[k], p[f"{k}_se"], DIGITS[k]) for k, _ in METRICS]
        diff = p["diffs"].get(ref, {})
        row += [_pm(*diff[k], DIGITS[k]) if k in diff else "–" for k in ("class_accuracy", "fid")]
        rows.append(row)
    return header, rows


def plot(points: list[dict]) -> bytes:
    """PNG, 2 x 2 panels: each metric against network evaluations (log axis), one colour per scale,
    DDIM and DPM-Solver++ as lines, the sampler with most evaluations as a dotted level, ±1 SE bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = reference_sampler(points)
    scales = sorted({p["scale"] for p in points}, key=_scale_order)
    colours = dict(zip(scales, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(2, 2, figsize=(9.0, 6.4), squeeze=False)
    for ax, (key, name) in zip(axes.flat, METRICS):
        for scale in scales:
            mine = [p for p in points if p["scale"] == scale and p.get(key) is not None]
            families: dict[str, list[dict]] = {}
            for p in mine:
                families.setdefault(p["family"], []).append(p)
            for family, members in sorted(families.items()):
                members.sort(key=lambda p: p["evaluations"])
                xs, ys = [p["evaluations"] for p in members], [p[key] for p in members]
                errs = [p.get(f"{key}_se") or 0.0 for p in members]
                style = {"DDIM": ("s", "--"), "DDPM": ("o", "")}.get(family, ("^", "-" if "@" not in family else "-."))
                ax.errorbar(xs, ys, yerr=errs, marker=style[0], linestyle=style[1] or "none", color=colours[scale],
                            capsize=2, markersize=4, label=f"{family}, scale {scale}")
            level = [p for p in mine if p["sampler"] == ref]
            if level:
                ax.axhline(level[0][key], color=colours[scale], linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per sample")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8)
    fig.suptitle(f"Quality against network evaluations (dotted: {ref}; bars: ±1 standard error)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
