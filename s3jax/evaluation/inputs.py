"""The videos of an evaluation sweep: given video files or the held-out split of a dataset."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional, Sequence

import numpy as np

from s3jax import input_pipeline, video


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
  """Video files or frame folders (the first ``max_frames`` frames; 0 = all)."""
  clips = []
  for p in paths:
    frames, _ = video.read_frames(
        p, max_frames=max_frames or None, resize_width=resize_width or None
    )
    clips.append(Clip(name=pathlib.Path(p).stem or str(p), frames=frames))
  return clips


def load_split_clips(data_dir: str, split: str, max_videos: int, max_frames: int) -> list[Clip]:
  """The first ``max_videos`` videos (``max_frames`` frames each) of a dataset split.

  A missing dataset raises ``FileNotFoundError`` naming the command that builds it.
  """
  splits = input_pipeline.available_splits(data_dir)
  if split not in splits:
    raise ValueError(f"{data_dir} has no split {split!r} (has {splits})")
  src = input_pipeline.open_split(data_dir, split)
  clips = []
  for v in input_pipeline.video_index(src)[: max_videos or None]:
    n = min(int(v["count"]), max_frames or int(v["count"]))
    recs = [src[int(v["start"]) + i] for i in range(n)]
    clips.append(
        Clip(
            name=str(v["video_id"]).replace("/", "_"),
            crops=np.stack([input_pipeline.decode_image(r["image"], 3) for r in recs]),
            z_id=np.stack([np.asarray(r["z_id"], np.float32) for r in recs]),
            z_lnd=np.stack([np.asarray(r["z_lnd"], np.float32) for r in recs]),
            landmarks=np.stack([np.asarray(r["landmarks"], np.float32) for r in recs]),
        )
    )
  if not clips:
    raise ValueError(f"split {split!r} of {data_dir} has no videos")
  return clips
