"""Sweep outputs: results.csv / results.json, summary.md, plots and TensorBoard scalars."""

from __future__ import annotations

import csv
import json
import logging
import math
import pathlib
import re
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats

from s3jax.evaluation.cells import METRICS_EDIT, METRICS_ID, METRICS_RECON, METRICS_TIME, RECON

CSV_COLUMNS = (
    ("checkpoint", "checkpoint_step", "video", "steps", "attribute", "strength", "method")
    + ("frames", "status")
    + METRICS_RECON
    + ("ms_ssim_scales",)
    + METRICS_ID
    + ("tl_id_raw", "tg_id_raw", "tl_id_input", "tg_id_input")
    + METRICS_EDIT
    + METRICS_TIME
    + ("error",)
)
TABLE_METRICS = (
    "ssim",
    "ms_ssim",
    "psnr",
    "mse",
    "lpips",
    "tl_id",
    "tg_id",
    "id_preservation",
    "attr_success",
    "locality",
    "locality_targets",
    "sec_per_frame",
)


def nan_to_none(d: dict) -> dict:
  """Non-finite floats -> None (JSON has no NaN)."""
  return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _mean(vals) -> float:
  v = [x for x in vals if x is not None and math.isfinite(x)]
  return float(np.mean(v)) if v else float("nan")


def aggregate(rows: Sequence[dict]) -> list[dict]:
  """Mean over videos per (checkpoint, steps, attribute, strength), ok cells only."""
  groups: dict = {}
  for r in rows:
    if r.get("status") != "ok":
      continue
    k = (r["checkpoint"], r["steps"], r["attribute"], r["strength"])
    groups.setdefault(k, []).append(r)
  out = []
  for (ck, steps, attr, s), rs in sorted(
      groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != RECON, kv[0][2], kv[0][3])
  ):
    row = {
        "checkpoint": ck,
        "steps": steps,
        "attribute": attr,
        "strength": s,
        "videos": len(rs),
        "frames": int(sum(r.get("frames", 0) for r in rs)),
    }
    for m in METRICS_RECON + ("ms_ssim_scales",) + METRICS_ID + METRICS_EDIT + METRICS_TIME:
      row[m] = _mean([r.get(m) for r in rs])
    out.append(row)
  return out


def _fmt(v, metric) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "–"
  if metric == "psnr":
    return f"{v:.2f}"
  if metric == "mse":
    return f"{v:.4f}"
  return f"{v:.3f}"


def markdown_table(agg: Sequence[dict]) -> str:
  """The summary table (columns: the metrics with at least one finite value)."""
  cols = [
      m
      for m in TABLE_METRICS
      if any(isinstance(r.get(m), float) and math.isfinite(r[m]) for r in agg)
  ]
  head = ["checkpoint", "steps", "edit"] + cols
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in agg:
    edit = "reconstruction" if r["attribute"] == RECON else f"{r['attribute']} {r['strength']:+g}"
    lines.append(
        "| "
        + " | ".join([r["checkpoint"], str(r["steps"]), edit] + [_fmt(r.get(m), m) for m in cols])
        + " |"
    )
  return "\n".join(lines) + "\n"


COMPARISON_METRICS = {
    # comparison name: sweep metric
    "locality": "locality_targets",
    "locality_edit": "locality_targets_edit",
    "faithfulness": "attr_success",
    "id_preservation": "id_preservation",
    "tl_id": "tl_id",
    "tg_id": "tg_id",
    "locality_face_mask": "locality",
}
_SEED_SUFFIX = re.compile(r"[_-]seed\d+$")


def method_family(method: str) -> str:
  """'s3editor_seed2' -> 's3editor': runs that differ only by seed pool into one row."""
  return _SEED_SUFFIX.sub("", method)


def _mean_ci95(vals) -> tuple:
  """Mean and the half-width of its 95% Student-t interval (NaN below two values)."""
  v = np.asarray([x for x in vals if x is not None and math.isfinite(x)], np.float64)
  if not len(v):
    return float("nan"), float("nan"), 0
  if len(v) < 2:
    return float(v.mean()), float("nan"), 1
  half = scipy_stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
  return float(v.mean()), float(half), len(v)


def comparison(rows: Sequence[dict]) -> list[dict]:
  """Edit methods side by side: per (method family, steps, attribute, strength), each
  metric's mean and 95% interval over videos x seeds (ok edit cells only). ``locality`` is
  the change outside the attribute's target regions (lower is better), ``faithfulness`` the
  attribute success on the re-encoded output, ``id_preservation`` the cosine to the input."""
  groups: dict = {}
  for r in rows:
    if r.get("status") != "ok" or r.get("attribute") == RECON:
      continue
    k = (method_family(r.get("method", "plain")), r["steps"], r["attribute"], r["strength"])
    groups.setdefault(k, []).append(r)
  out = []
  for (method, steps, attr, s), rs in sorted(groups.items()):
    row = {
        "method": method,
        "steps": steps,
        "attribute": attr,
        "strength": s,
        "runs": sorted({r.get("method", "plain") for r in rs}),
    }
    for name, metric in COMPARISON_METRICS.items():
      mean, half, n = _mean_ci95([r.get(metric) for r in rs])
      row[name], row[f"{name}_ci95"] = mean, half
      row["n"] = max(row.get("n", 0), n)
    out.append(nan_to_none(row))
  return out


def comparison_markdown(comp: Sequence[dict]) -> str:
  def cell(r, k):
    m, h = r.get(k), r.get(f"{k}_ci95")
    if m is None:
      return "–"
    return f"{m:.4f}" + (f" ± {h:.4f}" if h is not None else "")

  head = ["method", "steps", "edit", "n"] + list(COMPARISON_METRICS)
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in comp:
    lines.append(
        "| "
        + " | ".join(
            [r["method"], str(r["steps"]), f"{r['attribute']} {r['strength']:+g}", str(r["n"])]
            + [cell(r, k) for k in COMPARISON_METRICS]
        )
        + " |"
    )
  return "\n".join(lines)


def _lpips_label(config) -> str:
  spec = "unknown net" if config is None else config.get("lpips", "")
  return {"alex": "AlexNet", "vgg": "VGG16", "": "off"}.get(spec, spec)


def write_outputs(workdir, rows: Sequence[dict], config=None) -> dict:
  """Writes every output of the sweep from its cell rows -> {"summary", "plots"}."""
  workdir = pathlib.Path(workdir)
  with open(workdir / "results.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
  agg = aggregate(rows)
  (workdir / "results.json").write_text(
      json.dumps({"cells": rows, "summary": [nan_to_none(a) for a in agg]}, indent=1)
  )
  failed = [r for r in rows if r.get("status") != "ok"]
  md = [
      "# Evaluation sweep",
      "",
      f"{len(rows)} cells ({len(failed)} failed); mean over videos. ssim/ms_ssim/psnr/mse/"
      f"lpips: reconstruction vs input crops on [-1, 1] (lpips: {_lpips_label(config)}); "
      "tl_id/tg_id: STIT's, each frame pair's cosine divided by the same pair's in the input "
      "video, averaged (1 = as consistent); id_preservation: cosine to the input frame (the checkpoint's "
      "identity network: dlib or ArcFace); "
      "attr_success: "
      "classifier on re-encoded output; locality: mean |change| outside the face mask "
      "([-1, 1] units); locality_targets: mean |change| outside the attribute's target "
      "regions (landmark cells); sec_per_frame: DDIM decoding.",
      "",
      markdown_table(agg),
  ]
  if failed:
    md += ["", "Failed cells:", ""] + [
        f"- {r['checkpoint']} {r['video']} T={r['steps']} {r['attribute']} "
        f"{r['strength']:+g}: {r.get('error')}"
        for r in failed
    ]
  comp = comparison(rows)
  if len({r["method"] for r in comp}) > 1:
    (workdir / "comparison.json").write_text(json.dumps(comp, indent=1))
    md += [
        "",
        "## Methods compared",
        "",
        "Mean ± 95% interval over videos x seeds. locality: mean |change| outside the "
        "attribute's target regions (lower is better); locality_edit: the same against the "
        "reconstruction (the edit's own change); faithfulness: attribute success on the "
        "re-encoded output; id_preservation: cosine to the input (the checkpoint's identity "
        "network, not the one S3Editor trained with); locality_face_mask: outside the face.",
        "",
        comparison_markdown(comp),
    ]
  (workdir / "summary.md").write_text("\n".join(md) + "\n")
  plots = write_plots(workdir / "plots", agg)
  if config is None or config.get("tensorboard", True):
    write_tensorboard(workdir / "tensorboard", agg)
  return {"summary": agg, "plots": plots}


def write_plots(plot_dir: pathlib.Path, agg: Sequence[dict]) -> list[str]:
  """``<metric>_vs_strength.png`` (edits) and ``<metric>_vs_steps.png``; returns the paths."""
  # matplotlib is heavy and needs its backend chosen before pyplot loads: only here.
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  def save(fig, ax, path: pathlib.Path) -> str:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)

  plot_dir.mkdir(parents=True, exist_ok=True)
  written = []
  edits = [r for r in agg if r["attribute"] != RECON]
  recon = [r for r in agg if r["attribute"] == RECON]
  for metric in (
      "attr_success",
      "attr_logit_gain",
      "id_preservation",
      "tl_id",
      "tg_id",
      "locality",
  ):
    lines: dict = {}
    for r in edits:
      lines.setdefault((r["checkpoint"], r["attribute"], r["steps"]), []).append(
          (r["strength"], r[metric])
      )
    if not any(math.isfinite(v) for pts in lines.values() for _, v in pts):
      continue
    fig, ax = plt.subplots(figsize=(6, 4))
    for (ck, attr, steps), pts in sorted(lines.items()):
      # strength 0 of an attribute is the reconstruction of the same checkpoint/steps
      base = [r[metric] for r in recon if r["checkpoint"] == ck and r["steps"] == steps]
      if base and math.isfinite(base[0]) and not any(s == 0 for s, _ in pts):
        pts = pts + [(0.0, base[0])]
      pts = sorted(pts)
      ax.plot(
          [p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{attr} · {ck} · T={steps}"
      )
    ax.set_xlabel("edit strength")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs strength")
    written.append(save(fig, ax, plot_dir / f"{metric}_vs_strength.png"))
  for metric in (
      "ssim",
      "ms_ssim",
      "psnr",
      "mse",
      "lpips",
      "id_preservation",
      "tl_id",
      "sec_per_frame",
      "attr_success",
  ):
    lines = {}
    src = recon if metric != "attr_success" else edits
    for r in src:
      key = (
          (r["checkpoint"],)
          if r["attribute"] == RECON
          else (r["checkpoint"], r["attribute"], r["strength"])
      )
      lines.setdefault(key, []).append((r["steps"], r[metric]))
    if not any(math.isfinite(v) for pts in lines.values() for _, v in pts):
      continue
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, pts in sorted(lines.items()):
      pts = sorted(pts)
      ax.plot(
          [p[0] for p in pts],
          [p[1] for p in pts],
          marker="o",
          label=" · ".join(str(k) for k in key),
      )
    ax.set_xlabel("DDIM steps")
    ax.set_xscale("log")
    ax.set_ylabel(metric)
    ax.set_title(
        f"{metric} vs DDIM steps" + (" (reconstruction)" if metric != "attr_success" else "")
    )
    written.append(save(fig, ax, plot_dir / f"{metric}_vs_steps.png"))
  return written


def write_tensorboard(logdir: pathlib.Path, agg: Sequence[dict]) -> None:
  """Scalars: ``<ckpt>/reconstruction/<metric>`` at step = DDIM steps, and
  ``<ckpt>/T<steps>/<attribute>/<metric>`` at step = round(100 * strength)."""
  try:
    # clu's TensorBoard writer imports TensorFlow (seconds): only when scalars are written.
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("TensorBoard output skipped: clu.metric_writers unavailable (%s)", e)
    return
  writer = metric_writers.create_default_writer(str(logdir), just_logging=False)
  try:
    for r in agg:
      vals = {
          m: r[m]
          for m in TABLE_METRICS + ("attr_logit_gain",)
          if isinstance(r.get(m), float) and math.isfinite(r[m])
      }
      if r["attribute"] == RECON:
        writer.write_scalars(
            int(r["steps"]), {f"{r['checkpoint']}/reconstruction/{m}": v for m, v in vals.items()}
        )
      else:
        writer.write_scalars(
            int(round(100 * r["strength"])),
            {f"{r['checkpoint']}/T{r['steps']}/{r['attribute']}/{m}": v for m, v in vals.items()},
        )
    writer.flush()
  finally:
    writer.close()
