"""Stable Diffusion fine-tuning on captioned faces (IP-FaceDiff): the trainer's `sd_finetune` task.

Only the UNet trains; the VAE and the CLIP text encoder come with it from a diffusers-layout
``config.sd_dir`` (``sd.pipeline.StableDiffusion.load``) and stay frozen. One train step
(golden/ipfacediff SPEC.md §9.1, the released ``train_text_to_image.py``):

1. images (the shards' frames, [-1, 1]) are resized to ``config.resolution`` (bilinear, as its
   ``Resize((res, res))``; its ``RandomCrop(res)`` after that resize is the identity, so there
   is no crop), optionally flipped by the input pipeline (``data.flip``: its ``--random_flip``,
   off by default there);
2. ``z = sample(E(x)) * 0.18215``: the posterior SAMPLE (mean + std * N(0, I));
3. ``t ~ U{0..999}``, ``eps ~ N(0, I)``, ``z_t = add_noise(z, eps, t)`` on the fixed DDPM
   ``scaled_linear`` 0.00085..0.012 schedule of 1000 steps (hard-coded there too);
4. ``L_mse = mean((UNet(z_t, t, CLIP(caption)) - eps)^2)``;
5. AdamW (lr 1e-4, betas (0.9, 0.999), weight decay 1e-2, eps 1e-8), constant LR, gradients
   clipped to norm 1.0, batch 16; then ``state.apply_gradients`` (EMA, finite guard).

The paper's identity preservation ([READING], SPEC §9.2; off in the ``released`` config, on in
``paper``): from the same UNet call, the one-step prediction ``x0_hat = D((z_t - sqrt(1 - a_t)
eps_hat) / sqrt(a_t) / 0.18215)`` through the frozen VAE decoder, then
``L_id = 1 - cos(R(x), R(x0_hat))`` with a frozen identity net R (``loss.id_net``: ``official``
= IR-SE50 ArcFace, the published ``model_ir_se50.pth``, on its aligned-crop window;
``standin`` = the distilled ``id_standin`` net) and ``L_dir = 1 - cos(E_I(x0_hat) - E_I(x),
E_T(y_tgt) - E_T(y_src))`` with a frozen CLIP (``loss.clip_dir``), y_src = ``loss.dir_source``
and y_tgt the sample's caption (``loss.dir_target='caption'``) or a fixed prompt. Both are
averaged over the samples with ``t < loss.aux_t_max`` (a noisy x0_hat says little) among the
first ``loss.aux_samples`` of the batch (0: all; the decode through the VAE is what costs
memory). Loss = L_mse + loss.id * L_id + loss.dir * L_dir.

Captions are an input (no captioning model): ``captions.file``, a JSON object key -> caption.
A record (video_id v, frame_index f) takes the caption of key ``"v/f"``, else of ``"v"``
(``data_prep.celebahq`` makes v the image's file stem, f = 0). Keys that are image paths
count by their stem, so the reference's own files (``{"/.../celeba_hq_256/11504.jpg": ...}``)
work as they are. A record without a caption gets ``captions.template`` (``missing=
'template'``; the share is logged as ``caption_template``) or stops the run (``'error'``). The
reference trains on the captioned images only: build the shards from those images (or use
``'error'``) to match it. Captions are tokenized with truncation to 77 and padded to 77
(``captions.padding='max_length'``, what inference always sees); the reference pads to the
longest caption of each batch and so trains on fewer text tokens than it edits with:
``'longest_in_file'`` pads to the longest caption of the file, one static length for the run.

EMA (``config.ema``): ``'none'`` (the reference's default; the EMA copy equals the params),
``'reference_bug'`` (its ``--use_ema``: the decay it stores is overwritten every step with
``1 - min(previous, (1 + s) / (10 + s))``, so the average is ``ema <- ema - d_s (ema - theta)``
with d_s falling from 0.82 at step 1 to exactly 0.5 from step 8 on: ``(ema + theta) / 2``), or
a decay such as ``'0.9999'`` (a plain EMA, ``ema <- d ema + (1 - d) theta``).

FSDP: parameters and optimizer state are split with ``state.param_sharding`` over
``mesh.fsdp`` (the DVA task's rule); the frozen VAE / text encoder / identity net / CLIP too.

Export: the UNet (the EMA copy, which is the params with ``ema='none'``) is written back as a
diffusers-layout SD directory (``pipeline.save_sd_dir``: the frozen parts and the scheduler of
``sd_dir``, the trained ``unet/``) at the last step and every ``export_every`` steps, to
``export_dir`` (default ``<workdir>/sd_finetuned``); ``export_finetuned(workdir)`` does it
from a checkpoint. ``python -m s3jax.edit --method ipfacediff --sd <that dir>`` edits with it.

See docs/sd_finetune.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from s3jax import checkpointing, clip_edit, face_encoding, input_pipeline, loading, optim
from s3jax.checkpointing import TrainState, new_train_state
from s3jax.models import face_encoders
from s3jax.models.editor import l2_normalize
from s3jax.porting import encoder_keys, sd_vae_clip_keys
from s3jax.porting import state_dict as sdlib
from s3jax.sd import clip as clip_lib
from s3jax.sd import pipeline
from s3jax.sd.scheduler import SDScheduler
from s3jax.sd.tokenizer import CLIPTokenizer
from s3jax.sd.unet import SDUNet
from s3jax.sd.vae import AutoencoderKL
from s3jax.training import state as state_lib

LATENT_SCALE = pipeline.LATENT_SCALE
NUM_TRAIN_TIMESTEPS = 1000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_MISSING = ("template", "error")
CAPTION_PADDING = ("max_length", "longest_in_file")
ID_NETS = ("official", "standin")
EXPORT_SUBDIR = "sd_finetuned"
# The reference's EMAModel(decay=0.9999) before its first step.
REFERENCE_EMA_INITIAL_DECAY = 0.9999
BATCH_KEYS = ("image", "input_ids", "from_template")


class CaptionError(ValueError):
  """The captions cannot be used (missing file, a record without caption and missing='error')."""


# ---------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------
def caption_key(key: str) -> str:
  """A caption file's key as records look it up: an image path counts by its file stem
  (``/data/celeba_hq_256/11504.jpg`` -> ``11504``); any other key as it is."""
  p = pathlib.PurePosixPath(str(key).replace("\\", "/"))
  return p.stem if p.suffix.lower() in IMAGE_SUFFIXES else str(key)


def read_captions(path) -> dict:
  """{key: caption} of a JSON caption file, keys normalised by ``caption_key``."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CaptionError(
        f"caption file {path} not found: sd_finetune needs captions (JSON object "
        "'<video_id>[/<frame_index>]' or image path -> caption; config.captions.file)"
    )
  try:
    raw = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CaptionError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
    raise CaptionError(f"{path} must hold one JSON object mapping keys to caption strings")
  out = {}
  for key, caption in raw.items():
    k = caption_key(key)
    if k in out and out[k] != caption:
      raise CaptionError(f"{path}: keys {key!r} and another one both name record {k!r}")
    out[k] = caption
  return out


@dataclasses.dataclass
class CaptionTable:
  """Record -> caption, with the template for records the file lacks (module docstring)."""

  captions: dict
  template: str
  missing: str = "template"

  def __post_init__(self):
    if self.missing not in CAPTION_MISSING:
      raise ValueError(f"captions.missing must be one of {CAPTION_MISSING}, got {self.missing!r}")

  @classmethod
  def from_config(cls, captions_config) -> "CaptionTable":
    if not captions_config.file:
      raise CaptionError(
          "config.captions.file is empty: sd_finetune needs a JSON caption file "
          "(key -> caption; no captioning model is run)"
      )
    return cls(
        read_captions(captions_config.file),
        str(captions_config.template),
        str(captions_config.missing),
    )

  def caption_for(self, video_id: str, frame_index: int) -> tuple[str, bool]:
    """(caption, whether it is the template) of one record."""
    for key in (f"{video_id}/{int(frame_index)}", str(video_id)):
      if key in self.captions:
        return self.captions[key], False
    if self.missing == "error":
      raise CaptionError(
          f"no caption for record {video_id!r} frame {int(frame_index)} (keys "
          f"'{video_id}/{int(frame_index)}' or '{video_id}'), and captions.missing='error'"
      )
    return self.template, True

  def texts(self) -> list:
    """Every distinct text a record can get (the template last)."""
    return sorted(set(self.captions.values()) - {self.template}) + [self.template]


def tokenize_texts(tokenizer: CLIPTokenizer, texts, padding: str, max_length: int = 77):
  """(N, L) int32 ids of `texts`, truncated to max_length; L = max_length ('max_length') or the
  longest of the texts ('longest_in_file')."""
  if padding not in CAPTION_PADDING:
    raise ValueError(f"captions.padding must be one of {CAPTION_PADDING}, got {padding!r}")
  mode = "max_length" if padding == "max_length" else "longest"
  return tokenizer(list(texts), max_length=max_length, truncation=True, padding=mode)


# ---------------------------------------------------------------------------
# Optimizer and EMA
# ---------------------------------------------------------------------------
def decoupled_weight_decay(rate: float, learning_rate) -> optax.GradientTransformation:
  """AdamW's decoupled decay, chained after ``optim.make_optimizer``'s Adam: ``u -= lr_t * rate
  * p`` (torch.optim.AdamW's ``p *= 1 - lr * weight_decay`` before the Adam step).
  ``learning_rate`` is a float or the optax schedule Adam uses (same step count)."""

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params):
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    updates = jax.tree.map(lambda u, p: u - lr * rate * p, updates, params)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def make_adamw(optim_config) -> optax.GradientTransformation:
  """clip -> Adam (``optim.make_optimizer``, no coupled decay) -> decoupled weight decay."""
  if float(optim_config.get("weight_decay", 0.0) or 0.0):
    raise ValueError(
        "optim.weight_decay is make_optimizer's coupled (L2) decay; sd_finetune uses AdamW's "
        "decoupled one: set optim.decoupled_weight_decay instead"
    )
  tx = optim.make_optimizer(optim_config)
  rate = float(optim_config.get("decoupled_weight_decay", 0.0) or 0.0)
  if rate:
    tx = optax.chain(tx, decoupled_weight_decay(rate, optim.learning_rate_schedule(optim_config)))
  return tx


def reference_ema_decays(steps: int = 32, initial: float = REFERENCE_EMA_INITIAL_DECAY):
  """The reference EMA's decay d_s at optimisation step s = 1..steps-1 (index 0 unused): its
  ``get_decay`` overwrites the stored decay, ``d_s = 1 - min(d_{s-1}, (1 + s) / (10 + s))``.
  From s = 8 on it is exactly 0.5; the table's last entry holds for every later step."""
  out, d = [np.nan], float(initial)
  for s in range(1, steps):
    d = 1.0 - min(d, (1.0 + s) / (10.0 + s))
    out.append(d)
  table = np.asarray(out, np.float64)
  if not (table[-1] == table[-2] == 0.5 and (steps / (9.0 + steps)) > 0.5):
    raise AssertionError("the reference EMA decay has not settled at 0.5 within the table")
  return table


def ema_weight_fn(ema: str):
  """``ema`` -> ``step -> w``, the weight of the old EMA in ``state.ema_update`` (ema * w +
  (1 - w) * params), ``step`` the state's step before the update (traced)."""
  ema = str(ema)
  if ema == "none":
    return lambda step: jnp.zeros((), jnp.float32)
  if ema == "reference_bug":
    table = jnp.asarray(1.0 - reference_ema_decays(), jnp.float32)  # w_s = 1 - d_s
    return lambda step: table[jnp.minimum(step + 1, table.shape[0] - 1)]
  try:
    decay = float(ema)
  except ValueError:
    decay = -1.0
  if not 0.0 <= decay < 1.0:
    raise ValueError(
        f"config.ema must be 'none', 'reference_bug' or a decay in [0, 1), got {ema!r}"
    )
  return lambda step: jnp.asarray(decay, jnp.float32)


# ---------------------------------------------------------------------------
# Frozen networks
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class IdentityNet:
  """A frozen identity network: ``embed(variables, images [-1, 1] NHWC) -> (N, D)`` unit."""

  kind: str  # 'official' | 'standin'
  module: Any

  def embed(self, variables, images):
    if self.kind == "official":
      return self.module.apply(variables, images, method="id_feats")
    return self.module.apply({"params": variables}, images)


def load_identity_net(kind: str, directory) -> tuple[IdentityNet, Any]:
  """(IdentityNet, its variables): ``official`` reads the published IR-SE50 file of
  ``directory`` (``model_ir_se50.pth`` or its .safetensors twin); ``standin`` an ``id_standin``
  workdir."""
  if kind not in ID_NETS:
    raise ValueError(f"loss.id_net must be one of {ID_NETS}, got {kind!r}")
  if not directory:
    raise ValueError(f"loss.id > 0 needs loss.id_dir (the {kind} identity net)")
  if kind == "standin":
    model, params, _ = loading.load_id_standin(directory)
    return IdentityNet("standin", model), params
  path = face_encoding.encoder_file(directory, "idnet")
  variables = encoder_keys.import_published_encoder("idnet", sdlib.load_state_dict(path))
  # OfficialEncoders' variables hold each network under its name; only idnet runs here.
  return IdentityNet("official", face_encoders.OfficialEncoders()), {
      coll: {"idnet": tree} for coll, tree in variables.items()
  }


def clip_tokenizer_dir(loss_config, sd_tokenizer_dir) -> pathlib.Path:
  """``loss.clip_tokenizer_dir``, else ``loss.clip_dir`` when it holds vocab.json, else the SD
  model's tokenizer (OpenAI's CLIP models share one BPE vocabulary)."""
  for d in (loss_config.clip_tokenizer_dir, loss_config.clip_dir):
    if d and (pathlib.Path(d) / "vocab.json").is_file():
      return pathlib.Path(d)
  return pathlib.Path(sd_tokenizer_dir)


# ---------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------
class SDFinetuneTask:
  """Trainer task for ``s3jax.training.loop.train`` (see the module docstring).

  ``data_iterator``: optional iterator of input-pipeline batches (default: the train split).
  """

  def __init__(self, config, mesh, workdir, data_iterator=None):
    self.config = config
    self.mesh = mesh
    self.workdir = pathlib.Path(workdir)
    self.rng = jax.random.key(int(config.seed))
    self.captions = CaptionTable.from_config(config.captions)  # before the (slow) model load
    self.sd = pipeline.StableDiffusion.load(config.sd_dir)
    self.dtype = jnp.dtype(config.model.get("dtype", "float32"))
    self.unet = SDUNet(self.sd.unet_config, self.dtype)
    self.vae = AutoencoderKL(self.sd.vae_config, self.dtype)
    self.text_encoder = clip_lib.CLIPTextModel(self.sd.text_config, self.dtype)
    self.noise_schedule = SDScheduler()  # DDPM scaled_linear 0.00085..0.012, 1000 steps
    self.ema_weight = ema_weight_fn(config.ema)
    self.tx = make_adamw(config.optim)
    self.resolution = int(config.resolution)

    # Captions: every distinct text tokenized once; a record's ids are a table row.
    texts = self.captions.texts()
    self.text_row = {t: i for i, t in enumerate(texts)}
    self.caption_ids = tokenize_texts(
        self.sd.tokenizer,
        texts,
        config.captions.padding,
        self.sd.text_config.max_position_embeddings,
    )

    loss = config.loss
    self.use_id, self.use_dir = float(loss.id) > 0, float(loss.dir) > 0
    frozen = {"vae": self.sd.vae_params, "text": self.sd.text_params}
    self.id_net = None
    if self.use_id:
      self.id_net, frozen["id"] = load_identity_net(str(loss.id_net), loss.id_dir)
    self.clip_model = None
    if self.use_dir:
      if not loss.clip_dir:
        raise ValueError("loss.dir > 0 needs loss.clip_dir (a transformers CLIPModel folder)")
      clip_params, clip_config = sd_vae_clip_keys.load_clip_dir(loss.clip_dir)
      self.clip_model = clip_lib.CLIPModel(clip_config)
      tokenizer = CLIPTokenizer.from_dir(clip_tokenizer_dir(loss, self.sd.tokenizer_dir))
      width = clip_config.text.max_position_embeddings
      frozen["clip"] = clip_params
      frozen["clip_source_ids"] = tokenizer([str(loss.dir_source)], max_length=width)
      if str(loss.dir_target) == "caption":
        self.clip_target_ids = tokenizer(texts, max_length=width)
      else:
        self.clip_target_ids = tokenizer([str(loss.dir_target)] * len(texts), max_length=width)
    self.frozen_sharding = state_lib.param_sharding(mesh, frozen)
    self.frozen = jax.device_put(frozen, self.frozen_sharding)

    # The state: the SD UNet's params, split by the FSDP rule.
    def init_fn(params):
      return new_train_state(params, self.tx)

    params_shape = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.float32), self.sd.unet_params
    )
    abstract = jax.eval_shape(init_fn, params_shape)
    self.state_sharding = state_lib.param_sharding(mesh, abstract)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        self.state_sharding,
    )
    init_jit = jax.jit(
        init_fn, in_shardings=(self.state_sharding.params,), out_shardings=self.state_sharding
    )
    self.init_state = lambda: init_jit(
        jax.device_put(
            jax.tree.map(lambda a: np.asarray(a, np.float32), self.sd.unet_params),
            self.state_sharding.params,
        )
    )
    repl = state_lib.replicated(mesh)
    self._jit_step = jax.jit(
        self._train_step,
        in_shardings=(self.state_sharding, state_lib.batch_sharding(mesh), self.frozen_sharding),
        out_shardings=(self.state_sharding, repl),
        donate_argnums=0,
    )
    self.data_iterator = (
        data_iterator
        if data_iterator is not None
        else input_pipeline.make_train_iterator(config.data, seed=config.seed)
    )

  # -- data ------------------------------------------------------------------
  def global_batch(self, batch):
    """Images plus each frame's caption ids (B, k, L) and template flag (B, k)."""
    video_ids = np.asarray(batch["video_id"]).reshape(-1)
    frame_index = np.asarray(batch["frame_index"])
    rows = np.zeros(frame_index.shape, np.int64)
    from_template = np.zeros(frame_index.shape, np.float32)
    for b, vid in enumerate(video_ids):
      for k, f in enumerate(frame_index[b]):
        text, fallback = self.captions.caption_for(str(vid), int(f))
        rows[b, k] = self.text_row[text]
        from_template[b, k] = float(fallback)
    local = {
        "image": np.asarray(batch["image"], np.float32),
        "input_ids": self.caption_ids[rows],
        "from_template": from_template,
    }
    if self.use_dir:
      local["clip_ids"] = self.clip_target_ids[rows]
    return input_pipeline.to_global_arrays(local, self.mesh)

  # -- the pure train step -------------------------------------------------
  def train_step(self, state, batch):
    return self._jit_step(state, batch, self.frozen)

  def aux_losses(self, frozen, x, x0_hat, clip_ids, t):
    """({name: loss}, share of samples used) of the identity and directional CLIP terms."""
    cfg = self.config.loss
    n = int(cfg.aux_samples) or x.shape[0]
    x, x0_hat, t = x[:n], x0_hat[:n], t[:n]
    use = (t < int(cfg.aux_t_max)).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(use), 1.0)
    out = {}
    if self.use_id:
      e_src = jax.lax.stop_gradient(self.id_net.embed(frozen["id"], x))
      e_hat = self.id_net.embed(frozen["id"], x0_hat)
      out["l_id"] = jnp.sum(use * (1.0 - clip_edit.cosine(e_src, e_hat))) / count
    if self.use_dir:
      both = clip_edit.image_features(self.clip_model, frozen["clip"], jnp.concatenate([x, x0_hat]))
      f_src, f_hat = jax.lax.stop_gradient(both[:n]), both[n:]
      text = self.clip_model.apply(
          {"params": frozen["clip"]},
          jnp.concatenate([frozen["clip_source_ids"], clip_ids[:n]]),
          method=clip_lib.CLIPModel.text_features,
      )
      text = l2_normalize(text)
      direction = text[1:] - text[:1]
      out["l_dir"] = jnp.sum(use * (1.0 - clip_edit.cosine(f_hat - f_src, direction))) / count
    return out, jnp.mean(use)

  def _train_step(self, state: TrainState, batch, frozen):
    cfg = self.config
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
    x = flat["image"]
    n = x.shape[0]
    if x.shape[1:3] != (self.resolution, self.resolution):
      x = jax.image.resize(x, (n, self.resolution, self.resolution, x.shape[-1]), "bilinear")
    rng = jax.random.fold_in(self.rng, state.step)
    r_post, r_noise, r_t = jax.random.split(rng, 3)
    mean, logvar = self.vae.apply({"params": frozen["vae"]}, x, method=AutoencoderKL.encode)
    z = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(r_post, mean.shape)) * LATENT_SCALE
    noise = jax.random.normal(r_noise, z.shape)
    t = jax.random.randint(r_t, (n,), 0, NUM_TRAIN_TIMESTEPS)
    z_t = self.noise_schedule.add_noise(z, noise, t[:, None, None, None])
    context, _ = self.text_encoder.apply({"params": frozen["text"]}, flat["input_ids"])
    use_aux = self.use_id or self.use_dir

    def loss_fn(params):
      eps = self.unet.apply({"params": params}, z_t, t, context).astype(jnp.float32)
      mse = jnp.mean(jnp.square(eps - noise))
      terms, loss = {"mse": mse}, mse
      if use_aux:
        a = jnp.asarray(self.noise_schedule.alphas_cumprod)[t][:, None, None, None]
        z0_hat = (z_t - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
        x0_hat = self.vae.apply(
            {"params": frozen["vae"]}, z0_hat / LATENT_SCALE, method=AutoencoderKL.decode
        )
        aux, share = self.aux_losses(frozen, x, x0_hat, flat.get("clip_ids"), t)
        terms.update(aux, aux_share=share)
        loss = loss + float(cfg.loss.id) * aux.get("l_id", 0.0)
        loss = loss + float(cfg.loss.dir) * aux.get("l_dir", 0.0)
      return loss, terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    ema_weight = self.ema_weight(state.step)
    new_state, tail = state_lib.apply_gradients(state, grads, loss, self.tx, ema_weight)
    metrics = dict(
        terms,
        loss=loss,
        **tail,
        lr=optim.learning_rate_at(cfg.optim, state.step),
        ema_weight=ema_weight,
        caption_template=jnp.mean(flat["from_template"]),
    )
    return new_state, metrics

  # -- export ----------------------------------------------------------------
  def export_dir(self) -> pathlib.Path:
    return pathlib.Path(self.config.export_dir or self.workdir / EXPORT_SUBDIR)

  def export(self, state, out_dir=None) -> Optional[pathlib.Path]:
    """Writes the EMA UNet with the frozen parts as a diffusers-layout SD dir (process 0)."""
    params = state.ema_params
    if jax.process_count() > 1:  # FSDP shards live on other hosts too
      params = multihost_utils.process_allgather(params, tiled=True)
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(params))
    if jax.process_index() != 0:
      return None
    out = pathlib.Path(out_dir or self.export_dir())
    export_sd_dir(out, self.sd, params)
    return out

  def write_samples(self, state, step, writer):
    """Exports at the last step and every ``export_every`` steps (the loop calls this every
    ``sample_every`` steps and at the last)."""
    every = int(self.config.get("export_every", 0) or 0)
    if step == int(self.config.total_steps) or (every and step % every == 0):
      out = self.export(state)
      if out is not None:
        logging.info("sd_finetune step %d: exported the UNet to %s", step, out)


def export_sd_dir(out_dir, sd: pipeline.StableDiffusion, unet_params) -> pathlib.Path:
  """``sd`` with ``unet_params`` as a diffusers-layout directory (``pipeline.save_sd_dir``)."""
  return pipeline.save_sd_dir(out_dir, dataclasses.replace(sd, unet_params=unet_params))


def export_finetuned(workdir, out_dir=None, step: Optional[int] = None, ema: bool = True):
  """Exports a ``sd_finetune`` workdir's checkpoint (newest by default) as a diffusers-layout SD
  directory (default ``<workdir>/sd_finetuned``); returns its path. ``ema=False`` exports the
  raw params instead of the EMA copy."""
  step = checkpointing.latest_step(workdir) if step is None else int(step)
  config = checkpointing.read_config(workdir, step)
  sd = pipeline.StableDiffusion.load(config.sd_dir)
  saved = checkpointing.restore_saved_state(workdir, step)
  params = saved["ema_params" if ema else "params"]
  checkpointing.check_tree_matches(
      sd.unet_params, params, what=f"sd_finetune {workdir} step {step}"
  )
  out = pathlib.Path(out_dir or config.get("export_dir") or pathlib.Path(workdir) / EXPORT_SUBDIR)
  return export_sd_dir(out, sd, jax.tree.map(lambda a: np.asarray(a, np.float32), params))
