"""sora-jax: a JAX/Flax, TPU-first implementation of the Sora text-to-video recipe."""
from setuptools import find_packages, setup

# Compatible ranges, so that sora-jax installs beside other JAX projects (MaxText, MaxDiffusion) without
# moving their pins. Lower bounds: the JAX stack at the versions this code is written against (its APIs
# move between minor versions), the rest at releases with the features used here. No upper bounds: a
# break shows in CI, which installs the exact versions of constraints.txt (`make` does too:
# `pip install -e . -c constraints.txt`). README.md "Installing" records the check against MaxText's and
# MaxDiffusion's published requirements.
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "jaxlib>=0.10.2",
    "flax>=0.12.8",                 # NNX: use_eager_sharding, Optimizer(wrt=), to_pure_dict
    "optax>=0.2.4",
    "orbax-checkpoint>=0.12.0",
    "grain>=0.2.18",                # experimental packers, ArrayRecordDataSource (docs/hazards.md)
    "array-record>=0.8.1",
    "tensorflow-datasets>=4.9.10",  # ArrayRecord data sets without TensorFlow (4.9.9 breaks on protobuf 7)
    "sentencepiece>=0.2.0",
    "safetensors>=0.4.3",
    "ml-collections>=1.0.0",
    "absl-py>=2.1.0",
    "etils>=1.7.0",                 # epath (checkpoint data positions)
    "av>=14.0.0",                   # PyAV: mp4/gif in and out without an ffmpeg binary
    "numpy>=2.0",                   # jax 0.10's own floor
    "scipy>=1.14",                  # the detector (and jax's own floor)
    "pillow>=10.1.0",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
]

EXTRAS = {
    "dev": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100"],
    "tpu": ["libtpu>=0.0.44"],
    "gpu": ["jax-cuda12-plugin[with-cuda]>=0.10.2"],
    "interop": ["torch>=2.4", "diffusers>=0.35", "transformers>=4.50"],
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
