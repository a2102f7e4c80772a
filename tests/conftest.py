"""Tests run on 8 fake CPU devices; set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="module")
def shapes_videos(tmp_path_factory):
  """A tiny rendered Shapes video data set (6 train, 2 validation clips): the VAE trainer's input."""
  from sora_jax.data.shapes_dataset import build_shapes  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp("shapes")
  build_shapes(d, "train", 6)
  build_shapes(d, "validation", 2)
  return d
