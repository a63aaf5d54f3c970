"""s3jax.sd VAE, CLIP and tokenizer: golden vectors (golden/ipfacediff), the diffusers /
transformers oracles at other tiny configs, the transformers folder layout, importer errors."""

import functools
import json
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s3jax.parity.unet import rel_err
from s3jax.porting import sd_vae_clip_keys as keys
from s3jax.porting.state_dict import StateDictError, load_state_dict
from s3jax.sd import clip, vae
from s3jax.sd.tokenizer import CLIPTokenizer

TOL = 1e-5
SMALL_VAE = vae.VAEConfig(block_out_channels=(4,), layers_per_block=1, norm_num_groups=2)
PROMPTS = [
    "a man with blonde hair",
    "A MAN With   Blonde\tHair!!",
    "  leading and trailing spaces   ",
    "punctuation: (yes), [no]; {maybe}... it's, we're, I'll -- 42 + 7 = 49?",
    "café naïve — “quotes” and emoji \U0001f600",
    "new\nlines\n\nand <|endoftext|> inside",
    "",
    " ".join(["very long prompt with many repeated words"] * 12),
]


def nhwc(a):
  return jnp.asarray(np.transpose(a, (0, 2, 3, 1)))


def nchw(a):
  return np.transpose(np.asarray(a), (0, 3, 1, 2))


@pytest.fixture(scope="module")
def ipfd_dir(golden_dir):
  path = golden_dir.parent / "ipfacediff"
  if not (path / "io.npz").exists():
    pytest.skip(f"IP-FaceDiff golden vectors not found at {path}")
  return path


@pytest.fixture(scope="module")
def io(ipfd_dir):
  with np.load(ipfd_dir / "io.npz") as z:
    return dict(z)


@pytest.fixture(scope="module")
def tokenizer(ipfd_dir):
  return CLIPTokenizer.from_dir(ipfd_dir / "tokenizer")


@pytest.fixture(scope="module")
def golden_text(ipfd_dir):
  config = clip.CLIPTextConfig.from_transformers(
      json.loads((ipfd_dir / "text_encoder_config.json").read_text())
  )
  sd = load_state_dict(ipfd_dir / "text_encoder.safetensors")
  return config, sd


def random_params(abstract, seed):
  """Random float32 params shaped like `abstract`, drawn with numpy (no compile), with
  non-zero biases and non-unit norms, unlike Flax's initialisers."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(abstract)
  out = {}
  for path, s in flat.items():
    a = 0.2 * rng.normal(size=s.shape)
    out[path] = (a + (path[-1] == "scale")).astype(np.float32)
  return flax.traverse_util.unflatten_dict(out)


def test_init_params_match_the_importers_layout():
  params = vae.init_params(SMALL_VAE, jax.random.PRNGKey(0))
  abstract = keys.abstract_vae_params(SMALL_VAE)
  same = jax.tree_util.tree_map(
      lambda a, b: a.shape == b.shape and a.dtype == b.dtype, params, abstract
  )
  assert jax.tree_util.tree_all(same)
  assert float(np.std(params["encoder"]["conv_in"]["kernel"])) > 0.01


def vae_fns(config):
  model = vae.AutoencoderKL(config)
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=vae.AutoencoderKL.encode))
  decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=vae.AutoencoderKL.decode))
  return encode, decode


# ----------------------------------------------------------------------------- golden
def test_golden_vae(ipfd_dir, io):
  config = vae.VAEConfig.from_diffusers(json.loads((ipfd_dir / "vae_config.json").read_text()))
  params = keys.vae_params_from_state_dict(load_state_dict(ipfd_dir / "vae.safetensors"), config)
  encode, decode = vae_fns(config)
  mean, logvar = encode(params, nhwc(io["vae_in"]))
  decoded = decode(params, mean)
  errs = {
      "vae_posterior_mean": rel_err(nchw(mean), io["vae_posterior_mean"]),
      "vae_posterior_logvar": rel_err(nchw(logvar), io["vae_posterior_logvar"]),
      "vae_decoded": rel_err(nchw(decoded), io["vae_decoded"]),
  }
  print("golden VAE rel errors:", errs)
  assert all(e <= TOL for e in errs.values()), errs


def test_golden_tokenizer_exact(io, tokenizer):
  ids = tokenizer([str(p) for p in io["text_prompts"]])
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, io["text_input_ids"])


def test_golden_text_encoder(io, golden_text):
  config, sd = golden_text
  params = keys.clip_text_params_from_state_dict(sd, config)
  hidden, pooled = jax.jit(lambda p, i: clip.CLIPTextModel(config).apply({"params": p}, i))(
      params, io["text_input_ids"]
  )
  err = rel_err(hidden, io["text_last_hidden_state"])
  print("golden text_last_hidden_state rel error:", err)
  assert err <= TOL
  # eos_token_id 553 (not the legacy 2): pooled at the first eos.
  first_eos = np.argmax(io["text_input_ids"] == config.eos_token_id, axis=1)
  np.testing.assert_array_equal(pooled, np.asarray(hidden)[np.arange(4), first_eos])


def test_golden_float64(ipfd_dir, io, golden_text):
  """x64 run against io_f64.npz. The reference's float64 VAE input is 2*frames - 1 computed
  in float64 (not the float32 `vae_in`); the text encoder keeps transformers' float32 softmax,
  whose last-ulp rounding differs from XLA's (~3e-8)."""
  config = vae.VAEConfig.from_diffusers(json.loads((ipfd_dir / "vae_config.json").read_text()))
  vae_params = keys.vae_params_from_state_dict(
      load_state_dict(ipfd_dir / "vae.safetensors"), config
  )
  text_config, sd = golden_text
  text_params = keys.clip_text_params_from_state_dict(sd, text_config)
  with np.load(ipfd_dir / "io_f64.npz") as z:
    ref = dict(z)
  with jax.enable_x64(True):
    f64 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)  # noqa: E731
    model = vae.AutoencoderKL(config, dtype=jnp.float64)
    x = 2.0 * np.transpose(io["frames"][:2], (0, 2, 3, 1)).astype(np.float64) - 1.0

    @jax.jit
    def run_vae(params, x):
      mean, logvar = model.apply({"params": params}, x, method=vae.AutoencoderKL.encode)
      return mean, logvar, model.apply({"params": params}, mean, method=vae.AutoencoderKL.decode)

    mean, logvar, decoded = run_vae(f64(vae_params), x)
    hidden, _ = jax.jit(
        lambda p, i: clip.CLIPTextModel(text_config, dtype=jnp.float64).apply({"params": p}, i)
    )(f64(text_params), io["text_input_ids"])
    assert mean.dtype == hidden.dtype == jnp.float64
    errs = {
        "vae_posterior_mean": rel_err(nchw(mean), ref["vae_posterior_mean"]),
        "vae_posterior_logvar": rel_err(nchw(logvar), ref["vae_posterior_logvar"]),
        "vae_decoded": rel_err(nchw(decoded), ref["vae_decoded"]),
        "text_last_hidden_state": rel_err(hidden, ref["text_last_hidden_state"]),
    }
  print("golden float64 rel errors:", errs)
  assert max(v for k, v in errs.items() if k.startswith("vae")) <= 1e-12, errs
  assert errs["text_last_hidden_state"] <= 1e-6, errs


# ----------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("max_length", [77, 12])
def test_tokenizer_matches_transformers(ipfd_dir, tokenizer, max_length):
  from transformers import CLIPTokenizer as HFTokenizer  # Lazy: test oracle.
  from transformers import CLIPTokenizerFast

  for cls in (HFTokenizer, CLIPTokenizerFast):
    hf = cls.from_pretrained(str(ipfd_dir / "tokenizer"))
    want = hf(PROMPTS, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    np.testing.assert_array_equal(tokenizer(PROMPTS, max_length=max_length), np.array(want))
  longest = hf(PROMPTS, padding="longest")["input_ids"]
  np.testing.assert_array_equal(
      tokenizer(PROMPTS, truncation=False, padding="longest"), np.array(longest)
  )


def test_tokenizer_truncation_and_padding(tokenizer):
  long = tokenizer([PROMPTS[-1]], max_length=77)
  assert long.shape == (1, 77)
  assert long[0, 0] == tokenizer.tokenizer.token_to_id("<|startoftext|>")
  assert long[0, -1] == tokenizer.tokenizer.token_to_id("<|endoftext|>")
  untruncated = tokenizer([PROMPTS[-1], "a"], truncation=False)
  assert untruncated.shape[1] > 77  # the reference's negative-prompt path, as transformers
  assert (untruncated[1, 3:] == tokenizer.pad_token_id).all()
  assert tokenizer.decode(tokenizer(["a man talking"])[0]) == "a man talking"
  with pytest.raises(TypeError):
    tokenizer("a string, not a list")


# ----------------------------------------------------------------------------- VAE oracle
ORACLE_VAE = vae.VAEConfig(
    in_channels=3,
    out_channels=3,
    latent_channels=3,
    block_out_channels=(8, 16, 24),
    layers_per_block=2,
    norm_num_groups=4,
    sample_size=24,
)


def flax_path(torch_path: str) -> list[str]:
  """'encoder.down_blocks.0' -> ['encoder', 'down_blocks_0'] (the Flax module names)."""
  out = []
  for part in torch_path.split("."):
    if part.isdigit():
      out[-1] += f"_{part}"
    else:
      out.append(part)
  return out


def perturbed_torch_model(model, seed):
  """Every parameter (norms and zero-initialised biases included) gets random noise."""
  import torch  # Lazy: test oracle.

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model.eval()


@pytest.fixture(scope="module")
def diffusers_vae():
  import torch  # Lazy: test oracle.
  from diffusers import AutoencoderKL as TorchVAE

  torch.manual_seed(0)
  model = perturbed_torch_model(TorchVAE.from_config(ORACLE_VAE.to_diffusers()), 1)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  return model, sd


def test_vae_config_round_trip():
  assert vae.VAEConfig.from_diffusers(ORACLE_VAE.to_diffusers()) == ORACLE_VAE
  bad = dict(ORACLE_VAE.to_diffusers(), up_block_types=["AttnUpDecoderBlock2D"] * 3)
  with pytest.raises(ValueError, match="up_block_types"):
    vae.VAEConfig.from_diffusers(bad)


def test_vae_matches_diffusers_block_by_block(diffusers_vae):
  import torch  # Lazy: test oracle.

  model, sd = diffusers_vae
  params = keys.vae_params_from_state_dict(sd, ORACLE_VAE)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 24, 16)).astype(np.float32)
  z = np.random.default_rng(1).normal(size=(2, 3, 6, 4)).astype(np.float32)
  hooked = {
      "encoder.down_blocks.0": model.encoder.down_blocks[0],
      "encoder.mid_block": model.encoder.mid_block,
      "decoder.mid_block": model.decoder.mid_block,
      "decoder.up_blocks.0": model.decoder.up_blocks[0],
  }
  ref = {}
  for name, module in hooked.items():
    module.register_forward_hook(lambda m, i, o, name=name: ref.__setitem__(name, o.numpy()))
  with torch.no_grad():
    post = model.encode(torch.from_numpy(x)).latent_dist
    ref["mean"], ref["logvar"] = post.mean.numpy(), post.logvar.numpy()
    ref["decoded"] = model.decode(torch.from_numpy(z)).sample.numpy()

  m = vae.AutoencoderKL(ORACLE_VAE)

  @functools.partial(jax.jit, static_argnums=2)
  def run(params, x, method):
    return m.apply(
        {"params": params},
        x,
        method=method,
        capture_intermediates=lambda mdl, name: name == "__call__",
    )

  (mean, logvar), enc_state = run(params, nhwc(x), vae.AutoencoderKL.encode)
  decoded, dec_state = run(params, nhwc(z), vae.AutoencoderKL.decode)
  inter = {**enc_state["intermediates"], **dec_state["intermediates"]}
  ours = {"mean": nchw(mean), "logvar": nchw(logvar), "decoded": nchw(decoded)}
  for name in hooked:
    tree = inter
    for part in flax_path(name):
      tree = tree[part]
    ours[name] = nchw(tree["__call__"][0])
  errs = {k: rel_err(ours[k], ref[k]) for k in ref}
  print("diffusers AutoencoderKL (8,16,24) 24x16 rel errors:", errs)
  assert all(e <= TOL for e in errs.values()), errs


def test_vae_without_mid_attention_and_quant_convs():
  import torch  # Lazy: test oracle.
  from diffusers import AutoencoderKL as TorchVAE

  config = vae.VAEConfig(
      block_out_channels=(8, 8),
      layers_per_block=1,
      norm_num_groups=2,
      latent_channels=2,
      mid_block_add_attention=False,
      use_quant_conv=False,
      use_post_quant_conv=False,
  )
  torch.manual_seed(0)
  model = perturbed_torch_model(TorchVAE.from_config(config.to_diffusers()), 2)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  params = keys.vae_params_from_state_dict(sd, config)
  x = np.random.default_rng(2).uniform(-1, 1, (1, 3, 8, 12)).astype(np.float32)
  with torch.no_grad():
    ref = model.decode(model.encode(torch.from_numpy(x)).latent_dist.mean).sample.numpy()
  out = jax.jit(vae.AutoencoderKL(config).apply)({"params": params}, nhwc(x))
  assert rel_err(nchw(out), ref) <= TOL
  assert set(keys.vae_state_dict_from_params(params)) == set(sd)


def random_vae_state_dict(config, seed):
  params = random_params(keys.abstract_vae_params(config), seed)
  return params, keys.vae_state_dict_from_params(params)


def test_vae_state_dict_round_trip_and_deprecated_names():
  """Export then import is exact; old checkpoints' query/key/value/proj_attn (1x1-conv
  shaped) attention weights import to the same params."""
  params, sd = random_vae_state_dict(SMALL_VAE, 3)
  back = keys.vae_params_from_state_dict(sd, SMALL_VAE)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  renamed = {new: old for old, new in keys.DEPRECATED_ATTENTION_NAMES.items()}
  old_sd = {}
  for k, v in sd.items():
    for new, old in renamed.items():
      if f".attentions.0.{new}." in k:
        k = k.replace(f".{new}.", f".{old}.")
        v = v[:, :, None, None] if v.ndim == 2 else v
    old_sd[k] = v
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in old_sd
  old = keys.vae_params_from_state_dict(old_sd, SMALL_VAE)
  jax.tree_util.tree_map(np.testing.assert_array_equal, old, params)


# ----------------------------------------------------------------------------- CLIP oracle
def oracle_clip_config(eos_token_id):
  text = clip.CLIPTextConfig(
      vocab_size=64,
      hidden_size=32,
      intermediate_size=48,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=16,
      hidden_act="gelu",
      bos_token_id=62 if eos_token_id != 2 else 0,
      eos_token_id=eos_token_id,
      pad_token_id=1,
      projection_dim=16,
  )
  vision = clip.CLIPVisionConfig(
      hidden_size=24,
      intermediate_size=40,
      num_hidden_layers=2,
      num_attention_heads=2,
      image_size=32,
      patch_size=8,
      projection_dim=16,
  )
  return clip.CLIPConfig(text=text, vision=vision, projection_dim=16, logit_scale_init_value=2.0)


def clip_inputs(config):
  rng = np.random.default_rng(5)
  eos = config.text.eos_token_id
  ids = rng.integers(3, 60, (3, config.text.max_position_embeddings)).astype(np.int64)
  for row, n in zip(ids, (4, 9, 16)):  # eos then padding with eos (SD's layout)
    row[n - 1 :] = eos if eos != 2 else 63  # legacy configs pool at argmax(ids): put it there
  pixels = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
  return ids, pixels


def transformers_clip_outputs(model, ids, pixels):
  import torch  # Lazy: test oracle.

  with torch.no_grad():
    ids_t, pix_t = torch.from_numpy(ids), torch.from_numpy(pixels)
    text = model.text_model(input_ids=ids_t)
    vision = model.vision_model(pixel_values=pix_t)
    out = model(input_ids=ids_t, pixel_values=pix_t)
    return {
        "text_last_hidden_state": text.last_hidden_state.numpy(),
        "text_features": model.text_projection(text.pooler_output).numpy(),
        "vision_last_hidden_state": vision.last_hidden_state.numpy(),
        "image_features": model.visual_projection(vision.pooler_output).numpy(),
        "logits_per_image": out.logits_per_image.numpy(),
    }


@functools.lru_cache(maxsize=None)
def clip_outputs_fn(config):
  """One jitted function per config: every output the transformers oracle gives."""
  model = clip.CLIPModel(config)

  @jax.jit
  def run(params, ids, pixels):
    v = {"params": params}
    hidden, _ = clip.CLIPTextModel(config.text).apply({"params": params["text_model"]}, ids)
    vision_hidden, _ = clip.CLIPVisionModel(config.vision).apply(
        {"params": params["vision_model"]}, pixels
    )
    return {
        "text_last_hidden_state": hidden,
        "text_features": model.apply(v, ids, method=clip.CLIPModel.text_features),
        "vision_last_hidden_state": vision_hidden,
        "image_features": model.apply(v, pixels, method=clip.CLIPModel.image_features),
        "logits_per_image": model.apply(v, ids, pixels)["logits_per_image"],
    }

  return run


def our_clip_outputs(config, params, ids, pixels):
  return clip_outputs_fn(config)(params, ids, nhwc(pixels))


def compare(ours, ref, label):
  errs = {k: rel_err(ours[k], ref[k]) for k in ref}
  print(f"{label} rel errors:", errs)
  assert all(e <= TOL for e in errs.values()), errs


@pytest.fixture(scope="module", params=[7, 2], ids=["eos7", "legacy_eos2"])
def transformers_clip(request):
  import torch  # Lazy: test oracle.
  from transformers import CLIPConfig as HFConfig
  from transformers import CLIPModel as HFModel

  config = oracle_clip_config(request.param)
  torch.manual_seed(0)
  model = perturbed_torch_model(HFModel(HFConfig(**config.to_transformers())), 3)
  return config, model


def test_clip_config_round_trip(transformers_clip):
  config, model = transformers_clip
  assert clip.CLIPConfig.from_transformers(model.config.to_dict()) == config


def test_clip_matches_transformers(transformers_clip):
  config, model = transformers_clip
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  params = keys.clip_params_from_state_dict(sd, config)
  ids, pixels = clip_inputs(config)
  compare(
      our_clip_outputs(config, params, ids, pixels),
      transformers_clip_outputs(model, ids, pixels),
      f"transformers CLIPModel (eos {config.text.eos_token_id})",
  )


def test_save_load_clip_dir(transformers_clip, tmp_path):
  import torch  # Lazy: test oracle.
  from transformers import CLIPModel as HFModel
  from transformers import CLIPTextModel as HFTextModel

  config, _ = transformers_clip
  params = random_params(keys.abstract_clip_params(config), 4)
  keys.save_clip_dir(tmp_path / "clip", params, config)
  loaded, loaded_config = keys.load_clip_dir(tmp_path / "clip")
  assert loaded_config == config
  flat_a = flax.traverse_util.flatten_dict(jax.device_get(params))
  flat_b = flax.traverse_util.flatten_dict(loaded)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=str(k))

  hf, info = HFModel.from_pretrained(str(tmp_path / "clip"), output_loading_info=True)
  assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  ids, pixels = clip_inputs(config)
  compare(
      our_clip_outputs(config, params, ids, pixels),
      transformers_clip_outputs(hf.eval(), ids, pixels),
      "saved dir, transformers from_pretrained",
  )

  # Text tower alone (SD's text_encoder/ layout), and its text tower read from the full dir.
  text_params = params["text_model"]
  keys.save_clip_dir(tmp_path / "text", text_params, config.text)
  for d in ("text", "clip"):
    p, c = keys.load_clip_text_dir(tmp_path / d)
    assert c == config.text
    jax.tree_util.tree_map(np.testing.assert_array_equal, p, jax.device_get(text_params))
  hf_text, info = HFTextModel.from_pretrained(str(tmp_path / "text"), output_loading_info=True)
  assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  with torch.no_grad():
    ref = hf_text.eval()(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
  ours = our_clip_outputs(config, params, ids, pixels)["text_last_hidden_state"]
  assert rel_err(ours, ref) <= TOL


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kind", ["missing", "unexpected", "wrong_shape"])
def test_importer_errors_name_the_key(golden_text, kind):
  config, sd = golden_text
  sd = dict(sd)
  key = "text_model.encoder.layers.1.mlp.fc1.weight"
  if kind == "missing":
    del sd[key]
  elif kind == "unexpected":
    key = "text_model.encoder.layers.2.mlp.fc1.weight"
    sd[key] = np.zeros((64, 32), np.float32)
  else:
    sd[key] = sd[key].T
  with pytest.raises(StateDictError, match=kind.replace("_", " ") + ".*" + key.replace(".", r"\.")):
    keys.clip_text_params_from_state_dict(sd, config)


def test_vae_importer_missing_key():
  _, sd = random_vae_state_dict(SMALL_VAE, 4)
  del sd["decoder.mid_block.attentions.0.to_q.bias"]
  with pytest.raises(
      StateDictError, match=r"missing.*decoder\.mid_block\.attentions\.0\.to_q\.bias"
  ):
    keys.vae_params_from_state_dict(sd, SMALL_VAE)


def test_position_ids_buffer_is_ignored(golden_text):
  config, sd = golden_text
  with_buffer = dict(sd, **{"text_model.embeddings.position_ids": np.arange(77)[None]})
  a = keys.clip_text_params_from_state_dict(with_buffer, config)
  b = keys.clip_text_params_from_state_dict(sd, config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


# ----------------------------------------------------------------------------- preprocessing
def test_clip_preprocess():
  rng = np.random.default_rng(0)
  square = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  out = np.asarray(clip.clip_preprocess(square, 32))
  want = ((square + 1) / 2 - np.array(clip.CLIP_MEAN)) / np.array(clip.CLIP_STD)
  np.testing.assert_allclose(out, want, atol=1e-6)


@pytest.mark.parametrize("shape", [(70, 100), (100, 70), (20, 30)])
def test_clip_preprocess_matches_image_processor(shape):
  """transformers' CLIPImageProcessor (PIL) on uint8 images: the same up to its uint8
  rounding after the resize (1/255 over std ~0.27 = 0.015)."""
  from PIL import Image  # Lazy: test oracle (transformers' PIL backend).
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

  rng = np.random.default_rng(1)
  coarse = rng.uniform(0, 255, (shape[0] // 10 + 2, shape[1] // 10 + 2, 3)).astype(np.uint8)
  image = np.asarray(Image.fromarray(coarse).resize(shape[::-1], Image.BILINEAR))
  processor = CLIPImageProcessorPil(
      size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
  )
  ref = processor(images=[image], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  ours = np.asarray(clip.clip_preprocess(image[None].astype(np.float32) / 127.5 - 1.0, 32))
  assert ours.shape == ref.shape == (1, 32, 32, 3)
  diff = np.abs(ours - ref)
  assert diff.max() < 0.02 and diff.mean() < 0.006, (diff.max(), diff.mean())


def test_load_clip_dir_without_config(tmp_path):
  with pytest.raises(StateDictError, match="config.json"):
    keys.load_clip_dir(pathlib.Path(tmp_path))
