"""Evaluation sweeps: checkpoints x attributes x strengths x DDIM steps.

  python -m s3jax.evaluate --config configs/eval.py:demo --workdir runs/demo/eval
  python -m s3jax.evaluate --config configs/eval.py --workdir runs/eval \\
      --config.checkpoints='("runs/dva@all",)' --config.data.videos='("clip.mp4",)'

Inputs (``config.data``): given videos (files or frame folders, aligned with
dlib/STIT by ``s3jax.editing.VideoEditor.encode``) or, when ``videos`` is empty,
the held-out split of a ``data_prep`` dataset (already aligned records with their
cached z_id / z_lnd / landmarks).

A *cell* is (checkpoint, video, DDIM steps, attribute, strength). For every
(checkpoint, video, steps) one extra cell with attribute ``none`` and strength 0
is the DDIM reconstruction. Metrics per cell (mean over the video's frames):

* reconstruction (``none`` cells): ``ssim``, ``ms_ssim`` (as many of the 5 standard
  scales as fit the crop: a scale needs >= 11 px, so 64 px crops get 3 scales,
  >= 161 px all 5; the weights used are renormalised to sum to 1 and the count is
  in ``ms_ssim_scales``), ``psnr`` (dB, data range 2 for [-1, 1] images), ``mse``
  (on [-1, 1]), ``lpips`` only when ``config.lpips`` names a weights loader;
* ``tl_id`` / ``tg_id``: STIT's TL-ID / TG-ID of the output crops divided by the
  same figure for the input crops (1 = as consistent as the source), with the
  dlib 128-d descriptor (crops upscaled to 256 px); ``*_raw`` are unnormalised;
* ``id_preservation``: mean per-frame cosine between input and output descriptors;
* ``attr_success`` (edit cells): fraction of output frames that the attribute
  classifier, applied to the *re-encoded* z_id (the dlib descriptor of the output
  crop, i.e. exactly the z_id encoder), puts on the side of the edit
  (logit > 0 for strength > 0, < 0 for strength < 0); ``attr_logit_gain`` is the
  mean logit change in the direction of the edit relative to the *reconstruction*
  (so that reconstruction error, which moves the logit too, is not credited to the edit);
* ``locality``: mean |output - input| outside the landmark-hull video mask, in
  [-1, 1] units (0 = nothing changed outside the face);
* ``sec_per_frame``: DDIM decoding wall time per frame (compilation excluded),
  ``sec_per_frame_encode``: inversion per frame (reconstruction cells, when not
  read from the encoding cache).

Outputs in ``--workdir``: ``cells/*.json`` (one per finished cell: the sweep
resumes by skipping them), ``results.csv`` and ``results.json`` (every cell),
``summary.md`` (mean over videos per checkpoint/steps/attribute/strength),
``plots/*_vs_strength.png`` and ``plots/*_vs_steps.png``, TensorBoard scalars in
``tensorboard/`` and ``eval_config.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import pathlib
import time
from typing import Optional, Sequence

import numpy as np

RECON = "none"
ID_SIZE = 256  # crops are upscaled to this before the dlib descriptor
MS_SSIM_MAX_SCALES = 5

METRICS_RECON = ("ssim", "ms_ssim", "psnr", "mse", "lpips")
METRICS_ID = ("tl_id", "tg_id", "id_preservation")
METRICS_EDIT = ("attr_success", "attr_logit_gain", "locality")
METRICS_TIME = ("sec_per_frame", "sec_per_frame_encode")
CSV_COLUMNS = (
    ("checkpoint", "checkpoint_step", "video", "steps", "attribute", "strength", "frames", "status")
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
    "sec_per_frame",
)


# ---------------------------------------------------------------------------------- cells
@dataclasses.dataclass(frozen=True)
class Cell:
  checkpoint: str  # label, e.g. "demo@600"
  checkpoint_dir: str
  checkpoint_step: int
  video: str
  steps: int
  attribute: str
  strength: float

  @property
  def is_recon(self) -> bool:
    return self.attribute == RECON

  def key(self, data_fingerprint: str) -> str:
    ident = json.dumps(
        [
            self.checkpoint_dir,
            self.checkpoint_step,
            self.video,
            self.steps,
            self.attribute,
            round(float(self.strength), 6),
            data_fingerprint,
        ]
    )
    h = hashlib.sha1(ident.encode()).hexdigest()[:16]
    safe = "".join(
        ch if ch.isalnum() or ch in "-_." else "_"
        for ch in f"{self.checkpoint}_{self.video}_T{self.steps}_{self.attribute}_"
        f"{self.strength:+g}"
    )
    return f"{safe[:80]}-{h}"


def parse_checkpoint_spec(spec: str) -> list[tuple[str, str, Optional[int]]]:
  """'dir' (newest step), 'dir@STEP' or 'dir@all' -> [(label, dir, step or None)]."""
  path, _, step = str(spec).partition("@")
  name = pathlib.Path(path).name or path
  if step == "all":
    from s3jax.checkpointing import Checkpointer

    ck = Checkpointer(path, async_save=False)
    try:
      steps = ck.all_steps()
    finally:
      ck.close()
    if not steps:
      raise FileNotFoundError(f"no checkpoints under {path}/checkpoints")
    return [(f"{name}@{s}", path, int(s)) for s in steps]
  if step:
    return [(f"{name}@{int(step)}", path, int(step))]
  return [(name, path, None)]


def _latest_step(path) -> int:
  from s3jax.checkpointing import Checkpointer

  ck = Checkpointer(path, async_save=False)
  try:
    s = ck.latest_step()
  finally:
    ck.close()
  if s is None:
    raise FileNotFoundError(f"no checkpoints under {path}/checkpoints")
  return int(s)


# ---------------------------------------------------------------------------------- inputs
@dataclasses.dataclass
class Clip:
  """One evaluation video: raw frames (video files) or aligned records (held-out split)."""

  name: str
  frames: Optional[np.ndarray] = None  # (N, H, W, 3) uint8, to be aligned by the editor
  crops: Optional[np.ndarray] = None  # (M, S, S, 3) uint8 aligned (split records)
  z_id: Optional[np.ndarray] = None  # (M, D) per-frame z_id (split records)
  z_lnd: Optional[np.ndarray] = None  # (M, 102)
  landmarks: Optional[np.ndarray] = None  # (M, 68, 2) crop pixels at the crop size


def load_video_clips(paths: Sequence[str], max_frames: int, resize_width: int) -> list[Clip]:
  from s3jax import video

  clips = []
  for p in paths:
    frames, _ = video.read_frames(
        p, max_frames=max_frames or None, resize_width=resize_width or None
    )
    clips.append(Clip(name=pathlib.Path(p).stem or str(p), frames=frames))
  return clips


def load_split_clips(data_dir: str, split: str, max_videos: int, max_frames: int) -> list[Clip]:
  from s3jax import input_pipeline as ip

  if split not in ip.available_splits(data_dir):
    raise ValueError(f"{data_dir} has no split {split!r} (has {ip.available_splits(data_dir)})")
  src = ip.open_split(data_dir, split)
  clips = []
  for v in ip.video_index(src)[: max_videos or None]:
    n = min(int(v["count"]), max_frames or int(v["count"]))
    recs = [src[int(v["start"]) + i] for i in range(n)]
    clips.append(
        Clip(
            name=str(v["video_id"]).replace("/", "_"),
            crops=np.stack([ip.decode_image(r["image"], 3) for r in recs]),
            z_id=np.stack([np.asarray(r["z_id"], np.float32) for r in recs]),
            z_lnd=np.stack([np.asarray(r["z_lnd"], np.float32) for r in recs]),
            landmarks=np.stack([np.asarray(r["landmarks"], np.float32) for r in recs]),
        )
    )
  if not clips:
    raise ValueError(f"split {split!r} of {data_dir} has no videos")
  return clips


def _resize(crops: np.ndarray, size: int) -> np.ndarray:
  if crops.shape[1] == size:
    return crops
  import cv2

  interp = cv2.INTER_AREA if crops.shape[1] > size else cv2.INTER_CUBIC
  return np.stack([cv2.resize(c, (size, size), interpolation=interp) for c in crops])


def code_from_records(editor, clip: Clip, timings: dict):
  """A ``VideoCode`` for already aligned records: averaged z_id, video masks, DDIM inversion."""
  from s3jax import editing, face_features

  s = editor.size
  crops = _resize(clip.crops, s)
  lnd = (clip.landmarks.astype(np.float64) + 0.5) * (s / clip.crops.shape[1]) - 0.5
  masks = np.stack([face_features.hull_mask(l, s, for_video=True) for l in lnd]).astype(np.uint8)
  z_mean = editing.l2norm(clip.z_id.mean(0)).astype(np.float32)
  m = len(crops)
  x0 = crops.astype(np.float32) * (2.0 / 255.0) - 1.0
  invert = getattr(editor, "invert_crops", None)
  z_rep = np.repeat(z_mean[None], m, 0)
  if invert is not None:
    x_T = invert(x0, z_rep, clip.z_lnd, timings)
  else:  # the editor's chunked, sharded, compiled inversion
    x_T = editor._run_chunks("invert", x0, z_rep, clip.z_lnd, timings)  # pylint: disable=protected-access
  return editing.VideoCode(
      num_frames=m,
      frame_shape=tuple(crops.shape[1:]),
      frame_indices=np.arange(m),
      quads=np.zeros((m, 4, 2), np.float32),
      crops=crops,
      masks=masks,
      landmarks=lnd.astype(np.float32),
      z_lnd=clip.z_lnd.astype(np.float32),
      z_id_frames=clip.z_id.astype(np.float32),
      z_id=z_mean,
      x_T=np.asarray(x_T, np.float32),
      has_face=np.ones(m, bool),
      interpolated=np.zeros(m, bool),
      passthrough=[],
      align_report={},
      key=f"records:{clip.name}",
      timings=dict(timings),
  )


# --------------------------------------------------------------------------------- metrics
def to_model(x_u8) -> np.ndarray:
  return np.asarray(x_u8, np.float32) * (2.0 / 255.0) - 1.0


def ms_ssim_scales(size: int, max_scales: int = MS_SSIM_MAX_SCALES) -> int:
  """Most standard MS-SSIM scales (<= max_scales) whose every level fits the 11 px window."""
  from s3jax import metrics

  best = 0
  for levels in range(1, max_scales + 1):
    if metrics.ms_ssim_min_size(levels) <= size:
      best = levels
  return best


def pixel_metrics(orig_u8, out_u8, lpips_fn=None, max_scales: int = MS_SSIM_MAX_SCALES) -> dict:
  """SSIM / MS-SSIM / PSNR / MSE (and LPIPS) of uint8 crops, mean over frames."""
  from s3jax import metrics

  x, y = to_model(orig_u8), to_model(out_u8)
  res = {
      "ssim": float(np.mean(metrics.ssim(x, y))),
      "psnr": float(np.mean(metrics.psnr(x, y))),
      "mse": float(np.mean(metrics.mse(x, y))),
  }
  levels = ms_ssim_scales(min(x.shape[1:3]), max_scales)
  if levels:
    w = np.asarray(metrics.MS_SSIM_WEIGHTS[:levels], np.float64)
    res["ms_ssim"] = float(np.mean(metrics.ms_ssim(x, y, weights=tuple(w / w.sum()))))
  else:
    res["ms_ssim"] = float("nan")
  res["ms_ssim_scales"] = levels
  res["lpips"] = float(np.mean(lpips_fn(x, y))) if lpips_fn is not None else float("nan")
  return res


def identity_embeddings(crops_u8) -> np.ndarray:
  """dlib descriptors (L2-normalised) of aligned crops, upscaled to ``ID_SIZE`` px."""
  from s3jax import face_features

  return face_features.identity_embeddings(_resize(np.asarray(crops_u8), ID_SIZE))


def identity_metrics(e_orig: np.ndarray, e_out: np.ndarray) -> dict:
  from s3jax import metrics

  if len(e_orig) < 2:
    nan = float("nan")
    return {
        "tl_id": nan,
        "tg_id": nan,
        "tl_id_raw": nan,
        "tg_id_raw": nan,
        "tl_id_input": nan,
        "tg_id_input": nan,
        "id_preservation": float(metrics.identity_preservation(e_out, e_orig)),
    }
  return {
      "tl_id": float(metrics.tl_id_normalised(e_out, e_orig)),
      "tg_id": float(metrics.tg_id_normalised(e_out, e_orig)),
      "tl_id_raw": float(metrics.tl_id(e_out)),
      "tg_id_raw": float(metrics.tg_id(e_out)),
      "tl_id_input": float(metrics.tl_id(e_orig)),
      "tg_id_input": float(metrics.tg_id(e_orig)),
      "id_preservation": float(metrics.identity_preservation(e_out, e_orig)),
  }


def attribute_metrics(classifier, attribute: str, strength: float, e_recon, e_out) -> dict:
  """Classifier verdict on re-encoded output z_id (see the module docstring); the logit gain
  is measured against the reconstruction's descriptors ``e_recon``."""
  j = classifier.index(attribute)
  lr = classifier.logits(e_recon)[:, j]
  le = classifier.logits(e_out)[:, j]
  sign = float(np.sign(strength))
  if sign == 0:
    return {"attr_success": float("nan"), "attr_logit_gain": float("nan")}
  return {
      "attr_success": float(np.mean(np.sign(le) == sign)),
      "attr_logit_gain": float(np.mean((le - lr) * sign)),
  }


def locality(orig_u8, out_u8, masks) -> float:
  from s3jax import metrics

  return float(
      np.mean(
          metrics.locality_error(to_model(orig_u8), to_model(out_u8), np.asarray(masks, np.float32))
      )
  )


def load_lpips(spec: str):
  """``'module:function'`` returning ``(features_fn, linear_weights)`` -> ``lpips(x, y)``."""
  if not spec:
    return None
  import importlib
  from s3jax import metrics

  mod, _, fn = spec.partition(":")
  features_fn, weights = getattr(importlib.import_module(mod), fn)()
  return lambda x, y: metrics.lpips(x, y, features_fn=features_fn, linear_weights=weights)


# ----------------------------------------------------------------------------------- sweep
def _fingerprint(config) -> str:
  d = config.data
  return json.dumps(
      {
          "videos": list(d.videos),
          "data_dir": d.data_dir,
          "split": d.split,
          "max_videos": d.max_videos,
          "max_frames": d.max_frames,
          "resize_width": d.resize_width,
          "lpips": config.lpips,
      },
      sort_keys=True,
  )


def plan_cells(config, checkpoints, clips) -> list[Cell]:
  cells = []
  for label, path, step in checkpoints:
    for clip in clips:
      for steps in config.ddim_steps:
        cells.append(Cell(label, path, step, clip.name, int(steps), RECON, 0.0))
        for attr in config.attributes:
          for s in config.strengths:
            cells.append(Cell(label, path, step, clip.name, int(steps), str(attr), float(s)))
  return cells


def _nan_to_none(d: dict) -> dict:
  return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def run_cell(cell: Cell, editor, code, classifier, e_orig, lpips_fn, config, e_recon=None):
  """Decodes one cell and measures it -> (metrics dict, output crops).

  ``e_recon``: a callable giving the reconstruction's descriptors (edit cells)."""
  from s3jax import editing

  timings: dict = {}
  if cell.is_recon:
    z = code.z_id
  else:
    z = editing.edit_z_id(code.z_id, classifier, cell.attribute, cell.strength)
  out = editor.decode(code, z, timings)
  m = len(out)
  res = {
      "frames": m,
      "sec_per_frame": timings.get("decode", float("nan")) / m,
      "sec_per_frame_encode": float("nan"),
  }
  e_out = identity_embeddings(out)
  res.update(identity_metrics(e_orig, e_out))
  res["locality"] = locality(code.crops, out, code.masks)
  if cell.is_recon:
    res.update(pixel_metrics(code.crops, out, lpips_fn, int(config.ms_ssim_max_scales)))
    if not code.cache_hit and "invert" in code.timings:
      res["sec_per_frame_encode"] = code.timings["invert"] / m
    res["attr_success"] = res["attr_logit_gain"] = float("nan")
  else:
    res.update(attribute_metrics(classifier, cell.attribute, cell.strength, e_recon(), e_out))
  return res, out


def run_sweep(config, workdir, progress: bool = True) -> list[dict]:
  """Runs (or resumes) the sweep of ``config`` into ``workdir``; returns every cell's row."""
  from s3jax import editing
  from s3jax.training.dva import restore_dva

  workdir = pathlib.Path(workdir)
  cells_dir = workdir / "cells"
  cells_dir.mkdir(parents=True, exist_ok=True)
  (workdir / "eval_config.json").write_text(config.to_json_best_effort(indent=2))
  fp = _fingerprint(config)

  checkpoints = []
  for spec in config.checkpoints:
    for label, path, step in parse_checkpoint_spec(spec):
      step = _latest_step(path) if step is None else step
      checkpoints.append((label if "@" in label else f"{label}@{step}", path, step))
  if config.data.videos:
    clips = load_video_clips(config.data.videos, config.data.max_frames, config.data.resize_width)
  else:
    clips = load_split_clips(
        config.data.data_dir, config.data.split, config.data.max_videos, config.data.max_frames
    )
  classifier = None
  if config.attributes:
    if not config.classifier:
      raise ValueError("config.attributes needs config.classifier (a classifier workdir)")
    classifier = editing.load_classifier(config.classifier)
    for a in config.attributes:
      classifier.index(a)  # unknown attribute: fail before any work
  lpips_fn = load_lpips(config.lpips)

  cells = plan_cells(config, checkpoints, clips)
  done = {c: cells_dir / f"{c.key(fp)}.json" for c in cells}
  pending = [
      c
      for c in cells
      if not done[c].exists()
      or (config.retry_failed and json.loads(done[c].read_text()).get("status") != "ok")
  ]
  logging.info(
      "sweep: %d cells, %d already finished, %d to run",
      len(cells),
      len(cells) - len(pending),
      len(pending),
  )
  bar = None
  if progress:
    from tqdm import tqdm

    bar = tqdm(total=len(cells), initial=len(cells) - len(pending), desc="eval cells", unit="cell")
  clip_by_name = {c.name: c for c in clips}
  ran = 0
  for label, path, step in checkpoints:
    todo_ck = [c for c in pending if c.checkpoint == label]
    if not todo_ck:
      continue
    model, params, mcfg, _ = restore_dva(path, step=step)
    for steps in sorted({c.steps for c in todo_ck}):
      editor = editing.VideoEditor(
          path, steps=steps, model=(model, params, mcfg), cache=bool(config.cache_encodings)
      )
      for clip_name in [c.name for c in clips]:
        todo = [c for c in todo_ck if c.steps == steps and c.video == clip_name]
        if not todo:
          continue
        clip = clip_by_name[clip_name]
        try:
          timings: dict = {}
          if clip.frames is not None:
            code = editor.encode(clip.frames, cache_dir=workdir / "encode_cache")
          else:
            code = code_from_records(editor, clip, timings)
          e_orig = identity_embeddings(code.crops)
          recon_cell = Cell(label, path, step, clip_name, steps, RECON, 0.0)
          e_recon = _ReconEmbeddings(
              workdir / "embeddings" / f"{recon_cell.key(fp)}.npy", editor, code
          )
        except Exception as e:  # pylint: disable=broad-except
          logging.exception("encoding %s failed", clip_name)
          for c in todo:
            _write_cell(done[c], c, {"status": "failed", "error": f"{type(e).__name__}: {e}"})
            if bar:
              bar.update(1)
          continue
        for c in todo:
          if bar:
            bar.set_postfix_str(f"{c.checkpoint} T={c.steps} {c.attribute} {c.strength:+g}")
          try:
            res, out = run_cell(c, editor, code, classifier, e_orig, lpips_fn, config, e_recon)
            if c.is_recon:
              e_recon.store(out)
            res["status"] = "ok"
            if config.save_samples:
              _save_sample(workdir / "samples" / f"{c.key(fp)}.png", code.crops, out)
          except Exception as e:  # pylint: disable=broad-except
            logging.exception("cell %s failed", c)
            res = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
          _write_cell(done[c], c, res)
          ran += 1
          if bar:
            bar.update(1)
  if bar:
    bar.close()
  rows = [json.loads(done[c].read_text()) for c in cells if done[c].exists()]
  write_outputs(workdir, rows, config)
  logging.info("sweep: ran %d cells; outputs in %s", ran, workdir)
  return rows


class _ReconEmbeddings:
  """Descriptors of the reconstruction of one (checkpoint, video, steps), kept on disk so a
  resumed sweep need not decode the reconstruction again."""

  def __init__(self, path: pathlib.Path, editor, code):
    self.path, self.editor, self.code, self.value = path, editor, code, None

  def store(self, recon_crops) -> None:
    self.value = identity_embeddings(recon_crops)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    np.save(self.path, self.value)

  def __call__(self) -> np.ndarray:
    if self.value is None:
      if self.path.exists():
        self.value = np.load(self.path)
      else:
        self.store(self.editor.decode(self.code, self.code.z_id))
    return self.value


def _write_cell(path: pathlib.Path, cell: Cell, res: dict) -> None:
  row = dict(dataclasses.asdict(cell), **_nan_to_none(res))
  row.pop("checkpoint_dir", None)
  row["checkpoint_dir"] = cell.checkpoint_dir
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(row, indent=1))
  tmp.replace(path)


def _save_sample(path: pathlib.Path, orig, out, max_frames: int = 8) -> None:
  from PIL import Image

  path.parent.mkdir(parents=True, exist_ok=True)
  k = min(max_frames, len(out))
  grid = np.concatenate([np.concatenate(list(orig[:k]), 1), np.concatenate(list(out[:k]), 1)], 0)
  Image.fromarray(grid).save(path)


# --------------------------------------------------------------------------------- outputs
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
  if metric == "sec_per_frame":
    return f"{v:.3f}"
  return f"{v:.3f}"


def markdown_table(agg: Sequence[dict]) -> str:
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


def write_outputs(workdir, rows: Sequence[dict], config=None) -> dict:
  workdir = pathlib.Path(workdir)
  with open(workdir / "results.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
  agg = aggregate(rows)
  (workdir / "results.json").write_text(
      json.dumps({"cells": rows, "summary": [_nan_to_none(a) for a in agg]}, indent=1)
  )
  failed = [r for r in rows if r.get("status") != "ok"]
  md = [
      "# Evaluation sweep",
      "",
      f"{len(rows)} cells ({len(failed)} failed); mean over videos. ssim/ms_ssim/psnr/mse: "
      "reconstruction vs input crops; tl_id/tg_id: normalised by the input video (1 = as "
      "consistent); id_preservation: cosine to the input frame (dlib); attr_success: "
      "classifier on re-encoded output; locality: mean |change| outside the face mask "
      "([-1, 1] units); sec_per_frame: DDIM decoding.",
      "",
      markdown_table(agg),
  ]
  if failed:
    md += ["", "Failed cells:", ""] + [
        f"- {r['checkpoint']} {r['video']} T={r['steps']} {r['attribute']} "
        f"{r['strength']:+g}: {r.get('error')}"
        for r in failed
    ]
  (workdir / "summary.md").write_text("\n".join(md) + "\n")
  plots = write_plots(workdir / "plots", agg)
  if config is None or config.get("tensorboard", True):
    write_tensorboard(workdir / "tensorboard", agg)
  return {"summary": agg, "plots": plots}


def _save_plot(fig, ax, path: pathlib.Path) -> str:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return str(path)


def write_plots(plot_dir: pathlib.Path, agg: Sequence[dict]) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

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
    written.append(_save_plot(fig, ax, plot_dir / f"{metric}_vs_strength.png"))
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
    written.append(_save_plot(fig, ax, plot_dir / f"{metric}_vs_steps.png"))
  return written


def write_tensorboard(logdir: pathlib.Path, agg: Sequence[dict]) -> None:
  """Scalars: ``<ckpt>/reconstruction/<metric>`` at step = DDIM steps, and
  ``<ckpt>/T<steps>/<attribute>/<metric>`` at step = round(100 * strength)."""
  try:
    from clu import metric_writers
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


# ------------------------------------------------------------------------------------- CLI
def _define_flags():
  from absl import flags
  from ml_collections import config_flags

  if "config" not in flags.FLAGS:
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Sweep config, e.g. configs/eval.py:demo. Override fields with "
        "--config.<field>=<value>, e.g. --config.ddim_steps='(10,20)' "
        "--config.data.videos='(\"clip.mp4\",)'.",
        lock_config=True,
    )
  if "workdir" not in flags.FLAGS:
    flags.DEFINE_string(
        "workdir",
        None,
        "Output directory (re-running resumes: finished cells " "in <workdir>/cells are skipped).",
    )
  if "progress" not in flags.FLAGS:
    flags.DEFINE_bool("progress", True, "Show a tqdm progress bar over the cells.")
  return flags


def main(argv):
  from absl import app

  flags = _define_flags()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  if config is None or flags.FLAGS.workdir is None:
    raise app.UsageError("--config and --workdir are required (see --help)")
  if not config.data.videos:
    from data_prep.sample import ensure_sample_for

    ensure_sample_for(config.data)
  t0 = time.perf_counter()
  rows = run_sweep(config, flags.FLAGS.workdir, progress=flags.FLAGS.progress)
  ok = sum(r.get("status") == "ok" for r in rows)
  print(
      f"{ok}/{len(rows)} cells ok in {time.perf_counter() - t0:.1f}s; table: "
      f"{pathlib.Path(flags.FLAGS.workdir) / 'summary.md'}"
  )
  print((pathlib.Path(flags.FLAGS.workdir) / "summary.md").read_text())


if __name__ == "__main__":
  from absl import app as _app

  _define_flags()
  _app.run(main)
