"""Stable Diffusion fine-tuning on captioned faces (IP-FaceDiff; `s3jax.training.sd_finetune`).

  python -m s3jax.train --config configs/sd_finetune.py --workdir runs/sd_finetune \
      --config.sd_dir=models/stable-diffusion-v1-4 --config.captions.file=captions.json
  python -m s3jax.train --config configs/sd_finetune.py:paper --workdir runs/sd_finetune_id \
      --config.sd_dir=... --config.captions.file=... \
      --config.loss.id_dir=models/encoders --config.loss.clip_dir=models/clip-vit-base-patch16

Variants: '' or 'released' is the released train_text_to_image.py recipe (golden/ipfacediff
SPEC.md §9.1: AdamW 1e-4, betas (0.9, 0.999), weight decay 1e-2, eps 1e-8, constant LR, clip
1.0, batch 16, 512 px, 100 epochs of its 1,600 captioned CelebA-HQ images = 10,000 steps, no
EMA, no flip); 'paper' adds the paper's identity preservation ([READING] §9.2: ArcFace identity
loss and directional CLIP loss on the one-step x0 prediction). The data are `data_prep`
shards of aligned faces (e.g. `python -m data_prep.celebahq`, 256 px, upsampled to 512 as the
reference's Resize does). docs/sd_finetune.md explains every field.
"""

import ml_collections

from s3jax import config_blocks


def get_config(arg: str = ""):
  arg = config_blocks.parse_variant(arg, ("", "released", "paper"))
  c = ml_collections.ConfigDict()
  c.trainer = "sd_finetune"
  c.seed = 0
  c.sd_dir = "models/stable-diffusion-v1-4"  # diffusers layout (unet/, vae/, text_encoder/, ...)
  c.export_dir = ""  # '' -> <workdir>/sd_finetuned
  c.export_every = 0  # also export every N steps (0: at the last step only)
  c.resolution = 512

  c.data = config_blocks.data(
      data_dir="data/celebahq", image_size=256, batch_size=16, frames_per_item=1
  )
  c.data.flip = False  # the reference's --random_flip is opt-in

  c.captions = ml_collections.ConfigDict(
      dict(
          file="",  # JSON {'<video_id>[/<frame_index>]' or image path: caption}; required
          template="a photo of a face",  # for records the file lacks (missing='template')
          missing="template",  # 'template' | 'error'
          padding="max_length",  # 'max_length' (77, as inference) | 'longest_in_file'
      )
  )
  c.loss = ml_collections.ConfigDict(
      dict(
          id=0.0,  # weight of 1 - cos(R(x), R(x0_hat))
          dir=0.0,  # weight of the directional CLIP loss
          id_net="official",  # 'official' (IR-SE50 ArcFace file) | 'standin' (id_standin workdir)
          id_dir="",  # encoders dir holding model_ir_se50.pth, or the id_standin workdir
          clip_dir="",  # transformers CLIPModel folder (config.json + model.safetensors)
          clip_tokenizer_dir="",  # '' -> clip_dir if it has vocab.json, else the SD tokenizer
          dir_source="a photo of a face",
          dir_target="caption",  # 'caption' (each sample's) or a fixed target prompt
          aux_t_max=1000,  # identity/CLIP terms only on samples with t < aux_t_max
          aux_samples=0,  # ... among the first N of the batch (0: all)
      )
  )
  c.optim = ml_collections.ConfigDict(
      dict(
          lr=1e-4,
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          grad_clip=1.0,
          warmup_steps=0,  # the reference's 500 warm-up steps are ignored by 'constant'
          decoupled_weight_decay=1e-2,  # AdamW's
      )
  )
  c.ema = "none"  # 'none' | 'reference_bug' (its --use_ema) | a decay such as '0.9999'
  c.model = ml_collections.ConfigDict(dict(dtype="float32"))
  c.mesh = config_blocks.mesh()
  config_blocks.loop(c, 10_000, log_every=50, checkpoint_every=1000, sample_every=1000)

  if arg == "paper":
    c.loss.id = 0.1
    c.loss.dir = 0.1
    c.loss.aux_t_max = 500
    c.loss.aux_samples = 4
  return c
