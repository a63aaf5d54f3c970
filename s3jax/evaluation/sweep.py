"""Planning a sweep's cells, running them and resuming a stopped sweep."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Optional

import numpy as np
from tqdm import tqdm

from s3jax import checkpointing, editing, images, loading
from s3jax.evaluation import cells as cells_lib
from s3jax.evaluation import inputs, report
from s3jax.evaluation.cells import PLAIN, RECON, Cell


def parse_checkpoint_spec(spec: str) -> list[tuple[str, str, Optional[int]]]:
  """'dir' (newest step), 'dir@STEP' or 'dir@all' -> [(label, dir, step or None)]."""
  path, _, step = str(spec).partition("@")
  name = pathlib.Path(path).name or path
  if step == "all":
    return [(f"{name}@{s}", path, int(s)) for s in checkpointing.all_steps(path)]
  if step:
    return [(f"{name}@{int(step)}", path, int(step))]
  return [(name, path, None)]


def resolve_checkpoints(specs) -> list[tuple[str, str, int]]:
  """Every spec of ``config.checkpoints`` -> [(label 'name@step', dir, step)]."""
  out = []
  for spec in specs:
    for label, path, step in parse_checkpoint_spec(spec):
      step = int(checkpointing.latest_step(path)) if step is None else step
      out.append((label if "@" in label else f"{label}@{step}", path, step))
  return out


def load_clips(data) -> list[inputs.Clip]:
  """The sweep's videos from ``config.data``: given videos, else the held-out split."""
  if data.videos:
    return inputs.load_video_clips(data.videos, data.max_frames, data.resize_width)
  return inputs.load_split_clips(data.data_dir, data.split, data.max_videos, data.max_frames)


def data_fingerprint(config) -> str:
  """What, besides the cell itself, a finished cell's result depends on."""
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


def editor_methods(config) -> dict:
  """``config.editors`` -> {method name: S3Editor workdir, or None for 'plain'}."""
  out = {}
  for entry in config.get("editors", (PLAIN,)):
    entry = str(entry)
    name = PLAIN if entry == PLAIN else pathlib.Path(entry).name
    if name in out:
      raise ValueError(f"config.editors: two entries named {name!r}")
    out[name] = None if entry == PLAIN else entry
  return out


def plan_cells(config, checkpoints, clips) -> list[Cell]:
  """Per (checkpoint, clip, steps): the reconstruction cell, then method x attribute x strength.

  Cells of an S3Editor are labelled ``<checkpoint>+<editor name>``, so every table and plot
  shows them as rows of their own."""
  cells = []
  methods = list(editor_methods(config))
  for label, path, step in checkpoints:
    for clip in clips:
      for steps in config.ddim_steps:
        cells.append(Cell(label, path, step, clip.name, int(steps), RECON, 0.0))
        for method in methods:
          shown = label if method == PLAIN else f"{label}+{method}"
          for attr in config.attributes:
            for s in config.strengths:
              cells.append(
                  Cell(shown, path, step, clip.name, int(steps), str(attr), float(s), method)
              )
  return cells


def load_edit_fns(config, classifier) -> dict:
  """{method: edit_fn} of the S3Editors in ``config.editors``; each must know every
  attribute of the sweep (checked before any work)."""
  fns = {}
  for name, directory in editor_methods(config).items():
    if directory is None:
      continue
    fn = loading.load_editor(directory)
    missing = [a for a in config.attributes if a not in fn.attributes + fn.held_out]
    if missing:
      raise ValueError(
          f"S3Editor {directory} cannot edit {missing}; it knows {list(fn.attributes)}"
      )
    fns[name] = fn
  if fns and classifier is None:
    raise ValueError("config.editors with S3Editors needs config.attributes and a classifier")
  return fns


def target_regions(config) -> cells_lib.TargetRegions:
  """The first S3Editor's regions and part table, else the default ones."""
  for directory in editor_methods(config).values():
    if directory is not None:
      return cells_lib.TargetRegions.of_editor(directory)
  return cells_lib.TargetRegions.default()


def write_cell(path: pathlib.Path, cell: Cell, res: dict) -> None:
  """One finished cell's row (cell fields + results), written atomically."""
  row = dict(dataclasses.asdict(cell), **report.nan_to_none(res))
  row.pop("checkpoint_dir", None)
  row["checkpoint_dir"] = cell.checkpoint_dir
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(row, indent=1))
  tmp.replace(path)


def save_sample(path: pathlib.Path, orig, out, max_frames: int = 8) -> None:
  """A PNG strip: the first input crops above the matching output crops."""
  k = min(max_frames, len(out))
  grid = np.concatenate([np.concatenate(list(orig[:k]), 1), np.concatenate(list(out[:k]), 1)], 0)
  images.save_png(path, grid)


def run_sweep(config, workdir, progress: bool = True) -> list[dict]:
  """Runs (or resumes) the sweep of ``config`` into ``workdir``; returns every cell's row."""
  workdir = pathlib.Path(workdir)
  cells_dir = workdir / "cells"
  cells_dir.mkdir(parents=True, exist_ok=True)
  (workdir / "eval_config.json").write_text(config.to_json_best_effort(indent=2))
  fp = data_fingerprint(config)

  checkpoints = resolve_checkpoints(config.checkpoints)
  clips = load_clips(config.data)
  classifier = None
  if config.attributes:
    if not config.classifier:
      raise ValueError("config.attributes needs config.classifier (a classifier workdir)")
    classifier = loading.load_classifier(config.classifier)
    for a in config.attributes:
      classifier.index(a)  # unknown attribute: fail before any work
  edit_fns = load_edit_fns(config, classifier)
  targets = target_regions(config)
  lpips_fn = cells_lib.load_lpips(config.lpips)

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
    bar = tqdm(total=len(cells), initial=len(cells) - len(pending), desc="eval cells", unit="cell")
  clip_by_name = {c.name: c for c in clips}
  ran = 0
  for label, path, step in checkpoints:
    todo_ck = [c for c in pending if (c.checkpoint_dir, c.checkpoint_step) == (path, step)]
    if not todo_ck:
      continue
    model, params, mcfg, _ = loading.load_dva(path, step=step)
    encoders = None  # the first editor's compiled encoders serve every step count
    for steps in sorted({c.steps for c in todo_ck}):
      editor = editing.VideoEditor(
          path,
          steps=steps,
          model=(model, params, mcfg),
          cache=bool(config.cache_encodings),
          encoders=encoders,
      )
      encoders = editor.features
      for clip_name in [c.name for c in clips]:
        todo = [c for c in todo_ck if c.steps == steps and c.video == clip_name]
        if not todo:
          continue
        clip = clip_by_name[clip_name]
        try:
          if clip.frames is not None:
            code = editor.encode(clip.frames, cache_dir=workdir / "encode_cache")
            source_px = editing.FEATURE_SIZE
          else:
            code = editor.encode_aligned(
                clip.crops, clip.landmarks, clip.z_id, clip.z_lnd, name=clip.name
            )
            source_px = clip.crops.shape[1]
          landmarks_px = np.asarray(code.landmarks) * (code.crops.shape[1] / source_px)
          e_orig = cells_lib.identity_embeddings(code.crops, editor)
          recon_cell = Cell(label, path, step, clip_name, steps, RECON, 0.0)
          e_recon = cells_lib.ReconEmbeddings(
              workdir / "embeddings" / f"{recon_cell.key(fp)}.npy", editor, code
          )
        except Exception as e:  # pylint: disable=broad-except
          logging.exception("encoding %s failed", clip_name)
          for c in todo:
            write_cell(done[c], c, {"status": "failed", "error": f"{type(e).__name__}: {e}"})
            if bar:
              bar.update(1)
          continue
        for c in todo:
          if bar:
            bar.set_postfix_str(f"{c.checkpoint} T={c.steps} {c.attribute} {c.strength:+g}")
          try:
            res, out = cells_lib.run_cell(
                c,
                editor,
                code,
                classifier,
                e_orig,
                lpips_fn,
                config,
                e_recon,
                edit_fns=edit_fns,
                targets=targets,
                landmarks_px=landmarks_px,
            )
            if c.is_recon:
              e_recon.store(out)
            res["status"] = "ok"
            if config.save_samples:
              save_sample(workdir / "samples" / f"{c.key(fp)}.png", code.crops, out)
          except Exception as e:  # pylint: disable=broad-except
            logging.exception("cell %s failed", c)
            res = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
          write_cell(done[c], c, res)
          ran += 1
          if bar:
            bar.update(1)
  if bar:
    bar.close()
  rows = [json.loads(done[c].read_text()) for c in cells if done[c].exists()]
  report.write_outputs(workdir, rows, config)
  logging.info("sweep: ran %d cells; outputs in %s", ran, workdir)
  return rows
