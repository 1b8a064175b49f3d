"""Reports from `metrics.json` files: Markdown + HTML with plots and per-class sample grids, and JSON.

`build_report(inputs, out_dir)` is the library call (the demo uses it); `adm report` is its CLI.
Inputs are `metrics.json` files or folders searched for them (a sweep folder holding one evaluated
run per guidance scale, several runs to compare). Runs that differ only in their guidance scale form
a sweep: FID / IS / precision / recall / class accuracy are plotted against the scale. Runs that
differ in their sampler or number of steps form a steps sweep (evaluation.steps_report): the
metrics with their standard errors against network evaluations. The HTML page is laid out for a
browser window of 1300 px and less (plots wrap into rows; wide tables scroll inside their box).
"""
from __future__ import annotations

import html
import io
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from runtime.files import atomic_write_bytes, atomic_write_json, atomic_write_text

# ADM_SPEC §9: the paper's headline numbers and the released 256 px batch's evaluator output.
PAPER_RESULTS = [
    {"image_size": 64, "model": "ADM (dropout)", "fid": 2.07, "precision": 0.74, "recall": 0.63},
    {"image_size": 128, "model": "ADM-G", "fid": 2.97, "precision": 0.78, "recall": 0.59},
    {"image_size": 256, "model": "ADM-G", "fid": 4.59, "precision": 0.82, "recall": 0.52},
    {"image_size": 256, "model": "ADM-G + ADM-U", "fid": 3.94, "precision": 0.83, "recall": 0.53},
    {"image_size": 256, "model": "ADM-G + ADM-U, released samples (evaluator)", "inception_score": 215.84,
     "fid": 3.9426, "sfid": 6.1404, "precision": 0.8265, "recall": 0.5309},
    {"image_size": 512, "model": "ADM-G", "fid": 7.72, "precision": 0.87, "recall": 0.42},
    {"image_size": 512, "model": "ADM-G + ADM-U", "fid": 3.85, "precision": 0.84, "recall": 0.53},
]
COLUMNS = [("inception_score", "IS"), ("fid", "FID"), ("sfid", "sFID"), ("precision", "Precision"),
           ("recall", "Recall"), ("class_accuracy", "Class acc.")]
SCALE_KEYS = ("classifier_scale", "cfg_scale")
SWEEP_FIELDS = ("scale", "class_accuracy", "fid", "precision", "recall")
# Sample options that differ between runs of one sweep without making them different experiments:
# where the files went, and what `adm sample` records about each run (its options hash and
# hashed content include the scale; timings and machine details differ run to run).
RUN_SPECIFIC_OPTIONS = ("out", "out_dir", "output", "seed_offset", "options_hash", "content",
                        "seconds_last_run", "world_size", "device", "torch", "progress")


def find_metrics(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """metrics.json files named directly or found (recursively, sorted) under the given folders."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            hits = sorted(path.rglob("metrics.json"))
            if not hits:
                raise FileNotFoundError(f"no metrics.json under {path}: run `adm evaluate REF SAMPLES "
                                        f"--out {path}` first")
            found.extend(hits)
        else:
            raise FileNotFoundError(f"{path} does not exist (give metrics.json files or run folders)")
    return list(dict.fromkeys(p.resolve() for p in found))


def load_run(path: Path) -> dict:
    """One metrics.json as a run record with `label`, `path`, `metrics`, `options`, `scale`."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-run adm evaluate") from None
    if not isinstance(record, dict) or "metrics" not in record:
        raise ValueError(f"{path} is not a metrics.json written by adm evaluate (no 'metrics')")
    record = dict(record)
    record["path"] = str(path)
    options = record.get("options") or {}
    record["options"] = options
    record.setdefault("label", path.parent.name)
    return record


def _scale_key(runs: list[dict]) -> str | None:
    for key in SCALE_KEYS:
        if len({json.dumps(r["options"].get(key)) for r in runs if key in r["options"]}) > 1:
            return key
    return None


def find_sweeps(runs: list[dict]) -> list[dict]:
    """Groups of runs equal in everything but the guidance scale (>= 2 scales): `{label, scale_key, runs}`."""
    key = _scale_key(runs)
    if key is None:
        return []
    groups: dict[str, list[dict]] = {}
    for run in runs:
        if key not in run["options"] or run["options"][key] is None:
            continue
        rest = {k: v for k, v in run["options"].items()
                if k != key and k not in RUN_SPECIFIC_OPTIONS and not k.startswith("_")}
        signature = json.dumps([run.get("features"), run.get("reference"), rest], sort_keys=True, default=str)
        groups.setdefault(signature, []).append(run)
    sweeps = []
    for members in groups.values():
        scales = {float(r["options"][key]) for r in members}
        if len(scales) < 2:
            continue
        members.sort(key=lambda r: float(r["options"][key]))
        model = members[0]["options"].get("model")
        sweeps.append({"label": f"{key}" + (f" ({model})" if model else ""), "scale_key": key, "runs": members})
    return sweeps


def sweep_points(sweep: dict) -> list[dict]:
    """The report.json rows of a sweep: scale, class_accuracy, fid, precision, recall."""
    points = []
    for run in sweep["runs"]:
        m = run["metrics"]
        points.append({"scale": float(run["options"][sweep["scale_key"]]), "class_accuracy": m.get("class_accuracy"),
                       "fid": m.get("fid"), "precision": m.get("precision"), "recall": m.get("recall")})
    return points


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def plot_sweep(sweep: dict) -> bytes:
    """PNG: every available metric against the guidance scale, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sweep["runs"]
    scales = [float(r["options"][sweep["scale_key"]]) for r in runs]
    present = [(k, name) for k, name in COLUMNS if any(r["metrics"].get(k) is not None for r in runs)]
    # At most three panels a row: five in one row made a 1,760 px image that a 1,300 px window cut off.
    cols = min(3, len(present))
    rows = -(-len(present) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat[len(present):]:
        ax.set_visible(False)
    for ax, (key, name) in zip(axes.flat, present):
        values = [r["metrics"].get(key) for r in runs]
        xs = [s for s, v in zip(scales, values) if v is not None]
        ys = [v for v in values if v is not None]
        ax.plot(xs, ys, marker="o")
        ax.set_xlabel(sweep["scale_key"].replace("_", " "))
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.suptitle(sweep["label"])
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def class_grid(sample_path: str | os.PathLike, max_classes: int = 10, per_class: int = 8) -> np.ndarray | None:
    """uint8 image: one row per class (the first `max_classes` labels present), `per_class` samples each;
    without labels, the first samples in rows of `per_class`. None if the file is missing."""
    from evaluation import io as eio

    path = Path(sample_path)
    if not path.is_file():
        return None
    with eio.open_images(path) as images:
        labels = eio.read_labels(path, len(images))
        rows: list[list[int]] = []
        if labels is None:
            n = min(len(images), max_classes * per_class)
            rows = [list(range(i, min(i + per_class, n))) for i in range(0, n, per_class)]
        else:
            for cls in sorted(set(labels.tolist()))[:max_classes]:
                rows.append(np.flatnonzero(labels == cls)[:per_class].tolist())
        h, w = images.shape[1:3]
        pad = 2
        grid = np.full((len(rows) * (h + pad) + pad, per_class * (w + pad) + pad, 3), 255, np.uint8)
        for r, indices in enumerate(rows):
            for c, index in enumerate(indices):
                y, x = pad + r * (h + pad), pad + c * (w + pad)
                grid[y:y + h, x:x + w] = images.read(index, index + 1)[0]
    return grid


def grid_row_names(sample_path: str | os.PathLike, max_classes: int = 10) -> list[str] | None:
    """The names of class_grid's rows ("class 3", ...), or None for a file without labels."""
    from evaluation import io as eio

    path = Path(sample_path)
    if not path.is_file():
        return None
    with eio.open_images(path) as images:
        labels = eio.read_labels(path, len(images))
    if labels is None:
        return None
    return [f"class {c}" for c in sorted(set(labels.tolist()))[:max_classes]]


def _encode_png(image: np.ndarray, min_height: int = 0, row_names: Sequence[str] | None = None) -> bytes:
    """PNG bytes; small images are enlarged by an integer factor (nearest) to at least min_height.
    With `row_names` (one per grid row of equal height) each name is written in a margin at the left."""
    from PIL import Image, ImageDraw, ImageFont

    factor = max(1, -(-min_height // image.shape[0])) if min_height else 1
    if factor > 1:
        image = image.repeat(factor, axis=0).repeat(factor, axis=1)
    picture = Image.fromarray(image)
    if row_names:
        row = image.shape[0] / len(row_names)
        font = ImageFont.load_default(size=int(min(24, max(11, row * 0.45))))
        margin = int(max(font.getlength(n) for n in row_names)) + 12
        labelled = Image.new("RGB", (margin + picture.width, picture.height), "white")
        labelled.paste(picture, (margin, 0))
        draw = ImageDraw.Draw(labelled)
        for r, name in enumerate(row_names):
            draw.text((6, (r + 0.5) * row), name, fill="black", font=font, anchor="lm")
        picture = labelled
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1 else f"{value:.4f}"
    return str(value)


def _scale_of(run: dict) -> str:
    parts = [f"{k}={run['options'][k]}" for k in SCALE_KEYS if run["options"].get(k) is not None]
    return ", ".join(parts) or "–"


def _paper_rows(runs: list[dict]) -> list[dict]:
    sizes = {r.get("image_size") for r in runs if r.get("features") == "inception"}
    return [p for p in PAPER_RESULTS if p["image_size"] in sizes]


def build_report(inputs: Sequence[str | os.PathLike | dict], out_dir: str | os.PathLike,
                 title: str = "ADM evaluation report", grid_classes: int = 10, grid_per_class: int = 8) -> dict:
    """Write report.md, report.html, report.json and PNGs (plots, sample grids) to `out_dir`.

    `inputs`: metrics.json paths, folders holding them, or already loaded records (dicts as
    written by adm evaluate). Returns the report.json content: `runs` (label, metrics, options,
    image_size, features), `paper` (published numbers at the runs' resolutions), `guidance_sweep`
    (the first sweep's points `{scale, class_accuracy, fid, precision, recall}`, sorted by scale,
    or [] without a sweep), `guidance_sweeps` (every sweep, labelled) and `steps_sweeps` (runs that
    differ in sampler / steps: `{label, reference, points, figure}`, points from
    evaluation.steps_report.steps_points, with standard errors and paired differences).
    """
    out = Path(out_dir)
    runs = []
    paths = find_metrics([i for i in inputs if not isinstance(i, dict)])
    runs += [load_run(p) for p in paths]
    for i, record in enumerate(i for i in inputs if isinstance(i, dict)):
        rec = dict(record)
        rec.setdefault("options", {})
        rec["options"] = rec["options"] or {}
        rec.setdefault("label", f"run {i}")
        rec.setdefault("path", None)
        runs.append(rec)
    if not runs:
        raise ValueError("nothing to report: give metrics.json files or folders holding them")
    _unique_labels(runs)
    from evaluation import steps_report

    steps_sweeps = steps_report.find_steps_sweeps(runs, ignore=RUN_SPECIFIC_OPTIONS)
    in_steps = {id(r) for s in steps_sweeps for r in s["runs"]}
    # A steps sweep at two scales also looks like one two-scale guidance sweep per sampler: shown once.
    sweeps = [s for s in find_sweeps(runs) if not all(id(r) in in_steps for r in s["runs"])]
    figures: list[tuple[str, str]] = []   # (file name, caption)
    for i, sweep in enumerate(sweeps):
        name = f"sweep_{i}.png"
        atomic_write_bytes(out / name, plot_sweep(sweep))
        figures.append((name, f"Metrics against {sweep['label']}"))
    steps_summaries = []
    for i, sweep in enumerate(steps_sweeps):
        points = steps_report.steps_points(sweep)
        name = f"steps_{i}.png"
        atomic_write_bytes(out / name, steps_report.plot(points))
        steps_summaries.append({"label": sweep["label"], "reference": steps_report.reference_sampler(points),
                                "points": points, "figure": name})
    grids: list[tuple[str, str]] = []
    for i, run in enumerate(runs):
        grid = class_grid(run["samples"], grid_classes, grid_per_class) if run.get("samples") else None
        if grid is not None:
            name = f"grid_{i}.png"
            # 32 px digits are unreadable at their size: enlarge grids of small images (pixels kept sharp).
            names = grid_row_names(run["samples"], grid_classes)
            atomic_write_bytes(out / name, _encode_png(grid, min_height=400, row_names=names))
            what = "one row per class (named at the left)" if names else "samples in index order"
            grids.append((name, f"{run['label']}: {what}"))
    paper = _paper_rows(runs)
    summary = {
        "title": title,
        "runs": [{"label": r["label"], "path": r["path"], "metrics": r["metrics"], "options": r["options"],
                  "image_size": r.get("image_size"), "features": r.get("features"),
                  "num_samples": r.get("num_samples"), "warnings": _warnings(r),
                  "degenerate_features": bool(r.get("degenerate_features"))} for r in runs],
        "paper": paper,
        "guidance_sweep": sweep_points(sweeps[0]) if sweeps else [],
        "guidance_sweeps": [{"label": s["label"], "scale_key": s["scale_key"], "points": sweep_points(s)}
                            for s in sweeps],
        "steps_sweeps": steps_summaries,
    }
    atomic_write_text(out / "report.md", _markdown(summary, runs, figures, grids))
    atomic_write_text(out / "report.html", _html(summary, runs, figures, grids))
    atomic_write_json(out / "report.json", summary)
    return summary


def _unique_labels(runs: list[dict]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        base = run["label"]
        if base in seen:
            seen[base] += 1
            run["label"] = f"{base} ({seen[base]})"
        else:
            seen[base] = 1


DEGENERATE_MARK = "⚠ degenerate features"
WARNING_MARK = "⚠"


def _warnings(run: dict) -> list[str]:
    found = run.get("warnings")
    return [str(w) for w in found] if isinstance(found, list) else []


def _label_cell(run: dict) -> str:
    """The run's label, marked when the evaluator warned that its numbers may mean nothing."""
    if run.get("degenerate_features"):
        return f"{run['label']} {DEGENERATE_MARK}"
    return f"{run['label']} {WARNING_MARK}" if _warnings(run) else run["label"]


def _warning_lines(runs: list[dict]) -> list[str]:
    return [f"{r['label']}: {w}" for r in runs for w in _warnings(r)]


def _table_rows(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    shown = [(k, n) for k, n in COLUMNS if any(r["metrics"].get(k) is not None for r in runs)]
    header = ["Run", "Features", "N", "Guidance"] + [n for _, n in shown]
    rows = [[_label_cell(r), _features_name(r.get("features")), _fmt(r.get("num_samples")), _scale_of(r)]
            + [_fmt(r["metrics"].get(k)) for k, _ in shown] for r in runs]
    return header, rows


def _features_name(features) -> str:
    """"classifier:/long/path/domain.pt" -> "classifier:domain.pt": the folder only widens the table."""
    if not features:
        return "–"
    kind, sep, path = str(features).partition(":")
    return f"{kind}:{Path(path).name}" if sep else kind


def _paper_table(paper: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["Paper (Inception features)", "Size"] + [n for _, n in COLUMNS[:5]]
    rows = [[p["model"], f"{p['image_size']}"] + [_fmt(p.get(k)) for k, _ in COLUMNS[:5]] for p in paper]
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _comparability_note(runs: list[dict], paper: list[dict]) -> str:
    if paper:
        return ("Published numbers were computed on 50,000 samples against ADM's reference batches with "
                "the same Inception network; runs with fewer samples have a higher (biased) FID.")
    if any(r.get("features") == "inception" for r in runs):
        return "The paper publishes no numbers at these resolutions."
    return "These runs use domain features; the paper's Inception numbers are not comparable."


def _markdown(summary: dict, runs, figures, grids) -> str:
    parts = [f"# {summary['title']}", "", "## Metrics", "", _md_table(*_table_rows(runs)), ""]
    if _warning_lines(runs):
        parts += ["## Warnings", "", "The evaluator flagged these runs; their numbers may mean nothing:", ""]
        parts += [f"- {line}" for line in _warning_lines(runs)] + [""]
    if summary["paper"]:
        parts += ["## Published numbers", "", _md_table(*_paper_table(summary["paper"])), ""]
    parts += [_comparability_note(runs, summary["paper"]), ""]
    for s in summary["guidance_sweeps"]:
        parts += [f"## Guidance sweep: {s['label']}", "",
                  _md_table(["Scale", "FID", "Precision", "Recall", "Class acc."],
                            [[f"{p['scale']:g}", _fmt(p["fid"]), _fmt(p["precision"]), _fmt(p["recall"]),
                              _fmt(p["class_accuracy"])] for p in s["points"]]), ""]
    for name, caption in figures:
        parts += [f"![{caption}]({name})", ""]
    for s in summary["steps_sweeps"]:
        parts += ["## Quality against network evaluations", "", _STEPS_NOTE.format(ref=s["reference"]), "",
                  _md_table(*steps_report_table(s["points"])), "", f"![{s['label']}]({s['figure']})", ""]
    if grids:
        parts += ["## Samples per class", "", "| " + " | ".join(c for _, c in grids) + " |",
                  "|" + "---|" * len(grids), "| " + " | ".join(f"![{c}]({n})" for n, c in grids) + " |", ""]
    return "\n".join(parts)


_STEPS_NOTE = ("Each run's metrics ± one standard error (delete-half jackknife over its samples, binomial for "
               "class accuracy; `adm evaluate --standard-errors`). Δ: the difference to {ref} ± the paired "
               "standard error (every sampler draws the same x_T and label for a sample index).")


def steps_report_table(points: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The steps sweep's table (header, rows); see evaluation.steps_report.table."""
    from evaluation import steps_report

    return steps_report.table(points)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    # A table wider than the window scrolls inside its box instead of widening the page.
    return f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _html(summary: dict, runs, figures, grids) -> str:
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}"
             "td:first-child,th:first-child{text-align:left}.wide{overflow-x:auto;max-width:100%}"
             ".grids{display:flex;flex-wrap:wrap;gap:1.5em}figure{margin:0 0 1em 0;max-width:100%}"
             # Three grids a row in the 1200 px body; each scaled to its box, its pixels kept sharp.
             "img{max-width:100%;height:auto}.grids figure{width:370px}img.grid{image-rendering:pixelated;width:100%}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(summary['title'])}</title>"
             f"<style>{style}</style></head><body><h1>{html.escape(summary['title'])}</h1>",
             "<h2>Metrics</h2>", _html_table(*_table_rows(runs))]
    if _warning_lines(runs):
        parts += ["<h2>Warnings</h2><p>The evaluator flagged these runs; their numbers may mean nothing:</p><ul>"]
        parts += [f"<li>{html.escape(line)}</li>" for line in _warning_lines(runs)] + ["</ul>"]
    if summary["paper"]:
        parts += ["<h2>Published numbers</h2>", _html_table(*_paper_table(summary["paper"]))]
    parts.append(f"<p>{html.escape(_comparability_note(runs, summary['paper']))}</p>")
    for s in summary["guidance_sweeps"]:
        parts += [f"<h2>Guidance sweep: {html.escape(s['label'])}</h2>",
                  _html_table(["Scale", "FID", "Precision", "Recall", "Class acc."],
                              [[f"{p['scale']:g}", _fmt(p["fid"]), _fmt(p["precision"]), _fmt(p["recall"]),
                                _fmt(p["class_accuracy"])] for p in s["points"]])]
    for name, caption in figures:
        parts.append(f"<figure><img src='{html.escape(name)}' alt='{html.escape(caption)}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    for s in summary["steps_sweeps"]:
        parts += ["<h2>Quality against network evaluations</h2>",
                  f"<p>{html.escape(_STEPS_NOTE.format(ref=s['reference']))}</p>",
                  _html_table(*steps_report_table(s["points"])),
                  f"<figure><img src='{html.escape(s['figure'])}' alt='{html.escape(s['label'])}'>"
                  f"<figcaption>{html.escape(s['label'])}</figcaption></figure>"]
    if grids:
        parts.append("<h2>Samples per class</h2><div class='grids'>")
        parts += [f"<figure><img class='grid' src='{html.escape(n)}' alt='{html.escape(c)}'>"
                  f"<figcaption>{html.escape(c)}</figcaption></figure>" for n, c in grids]
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
