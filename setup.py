"""sora-jax: a JAX/Flax, TPU-first implementation of the Sora text-to-video recipe."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "tensorflow-datasets==4.9.10",
    "sentencepiece==0.2.3",
    "safetensors==0.8.0",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "av==18.1.0",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
]

EXTRAS = {
    "dev": ["pytest==9.2.0", "pytest-xdist==3.8.0", "hypothesis==6.170.17"],
    "tpu": ["libtpu==0.0.52"],
    "gpu": ["jax-cuda12-plugin[with-cuda]==0.10.2"],
    "interop": ["torch==2.13.0", "diffusers==0.42.1", "transformers==5.25.0"],
}

setup(
    name="sora-jax",
    version="0.1.0",
    description="Text-to-video diffusion over spacetime patches, in JAX/Flax NNX.",
    packages=find_packages(include=["sora_jax", "sora_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
