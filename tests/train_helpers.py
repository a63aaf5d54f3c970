"""Tiny DVA configs and CLI runners shared by the tests and their subprocesses."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `configs` is importable from a checkout (also in subprocesses)
  sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import configs  # noqa: E402
from s3jax import loading  # noqa: E402
from s3jax.checkpointing import Checkpointer, TrainState  # noqa: E402
from s3jax.models import editor as E  # noqa: E402
from s3jax.models import face_encoders  # noqa: E402


def tiny_dva_config(data_dir, total_steps=6, **overrides):
  """A 32 px two-level UNet on the sample data: compiles in seconds, trains in ms/step."""
  c = configs.get("voxceleb:demo")
  c.data.data_dir = str(data_dir)
  c.data.image_size = 32
  c.data.batch_size = 4
  c.data.frames_per_item = 2
  c.model.unet.update(
      dict(
          image_size=32,
          model_channels=32,
          channel_mult=(1, 2),
          num_res_blocks=1,
          attention_resolutions=(16,),
      )
  )
  c.diffusion.eval_steps = 10
  c.num_sample_rows = 2
  c.total_steps = total_steps
  c.log_every = 1
  c.checkpoint_every = 3
  c.sample_every = 10_000
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


# The smallest UNet the DVA accepts (16 px, two levels): for tests of loading, export and the CLIs.
TINY_UNET = dict(
    image_size=16,
    in_channels=3,
    out_channels=3,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    embed_channels=512,
    num_heads=1,
    dropout=0.0,
    resblock_updown=True,
)


def run_module(module, *args, timeout=900) -> subprocess.CompletedProcess:
  """`python -m MODULE ARGS` from the repo root: each app keeps its absl flags in its own process."""
  return subprocess.run(
      [sys.executable, "-m", module, *map(str, args)],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def run_convert(*args, timeout=900) -> subprocess.CompletedProcess:
  """`python -m s3jax.convert ARGS`."""
  return run_module("s3jax.convert", *args, timeout=timeout)


def tiny_edit_config(face_features="dlib"):
  """A 32 px one-level DVA for the editing tests (compiles in seconds)."""
  cfg = configs.get("voxceleb:demo")
  cfg.model.face_features = face_features
  cfg.model.unet.image_size = 32
  cfg.model.unet.model_channels = 32
  cfg.model.unet.channel_mult = (1, 1)
  cfg.model.unet.num_res_blocks = 1
  cfg.model.unet.attention_resolutions = ()
  cfg.model.unet.embed_channels = 64
  cfg.data.image_size = 32
  return cfg


def tiny_official_config():
  """``tiny_edit_config`` on the published encoders' features (614-d fusion input)."""
  return tiny_edit_config("official")


def random_encoder_variables(seed=0):
  """OfficialEncoders variables with fixed random values (numpy: one generator, fast).

  Kernels N(0, 1/fan_in); BatchNorm scale U(0.8, 1.2), running mean U(-0.1, 0.1), running
  var U(0.5, 1.5); biases U(-0.1, 0.1); PReLU slopes U(0, 0.3).
  """
  r = np.random.default_rng(seed)
  flat, tree = jax.tree_util.tree_flatten_with_path(face_encoders.init_variables())
  leaves = []
  for path, a in flat:
    name = str(getattr(path[-1], "key", path[-1]))
    shape = a.shape
    if name in ("kernel", "classifier_kernel"):
      v = r.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif name == "scale":
      v = r.uniform(0.8, 1.2, shape)
    elif name == "var":
      v = r.uniform(0.5, 1.5, shape)
    elif name == "alpha":
      v = r.uniform(0.0, 0.3, shape)
    else:  # biases, running means
      v = r.uniform(-0.1, 0.1, shape)
    leaves.append(v.astype(np.float32))
  return jax.tree_util.tree_unflatten(tree, leaves)


def random_s3editor(directory, classifier_dir):
  """An S3Editor workdir over the two attributes of the classifier at ``classifier_dir``
  (K=2, R=3): its meta and a checkpoint whose transformations are random (so its edit is
  not the plain one). The first attribute targets region 0, the second regions 1-2."""
  c = loading.load_classifier(classifier_dir)
  stats = E.make_edit_stats(np.asarray(c.weight).T, c.mean, c.std, 2, seed=0)
  model = E.Editor(2, 3, 2, normalize_output=True)
  params = model.init(
      jax.random.key(0),
      jnp.zeros((1, 128)),
      jnp.zeros(1, jnp.int32),
      0.5,
      stats=stats,
  )["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(
      tree, [x + 0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  )
  hp = dict(
      num_clusters=2,
      num_regions=3,
      neurons_per_region=2,
      routing="hard",
      temperature=0.1,
      normalize_output=True,
  )
  targets = np.array([[True, False, False], [False, True, True]])
  loading.save_editor_meta(
      directory, list(c.names), stats, E.landmark_regions(None, 3), targets, E.MEAN_LANDMARKS_68, hp
  )
  state = TrainState(
      step=jnp.int32(1),
      params={"editor": params},
      ema_params={"editor": params},
      opt_state={},
  )
  ck = Checkpointer(directory, async_save=False)
  ck.save(1, state, force=True)
  ck.close()
  return directory


def random_generator_state_dict(config, seed: int = 0) -> dict:
  """A stylegan2 ``G.state_dict()`` with random weights for ``config`` (numpy: a jitted init
  spends ~15 s compiling RNG ops). Buffers are as constructed; affine biases and noise
  strengths positive, as trained ones are."""
  from s3jax.models import stylegan2  # noqa: PLC0415
  from s3jax.porting import stylegan2_keys  # noqa: PLC0415

  rng = np.random.default_rng(seed)
  sd = {}
  for key, (_, _, _, shape) in stylegan2_keys.key_table(config).items():
    sd[key] = rng.standard_normal(shape).astype(np.float32)
    if key.endswith("resample_filter"):
      sd[key] = stylegan2.setup_filter(config.resample_filter)
    elif key.endswith(("noise_strength", "affine.bias")):
      sd[key] = np.abs(sd[key]) + 0.1
  return sd


def start_with_fake_devices(module: str, function: str, out, devices: int = 2, **env_extra):
  """Starts ``tests/<module>.<function>(out)`` in a subprocess that sees ``devices`` fake CPU
  devices (XLA_FLAGS must be set before jax is imported); returns the ``Popen``."""
  import os  # noqa: PLC0415

  env = dict(
      os.environ,
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
      PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
      **{k: str(v) for k, v in env_extra.items()},
  )
  code = f"import sys, {module}; {module}.{function}(sys.argv[1])"
  return subprocess.Popen(
      [sys.executable, "-c", code, str(out)],
      env=env,
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
