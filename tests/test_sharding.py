"""Logical-to-mesh sharding rules: valid specs for any shape, FSDP/tensor layouts of the real DiT."""
import jax
from flax import nnx
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sora_jax import sharding
from sora_jax.models.dit import DiT
import train_fixtures as tf


@pytest.fixture(scope="module")
def mesh222():
  return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def test_make_mesh_fills_minus_one_and_rejects_bad_shapes():
  assert dict(sharding.make_mesh({"data": -1, "fsdp": 2}).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="does not divide 8 devices"):
    sharding.make_mesh({"data": -1, "fsdp": 3})
  with pytest.raises(ValueError, match="needs 4 devices; 8 are present"):
    sharding.make_mesh({"data": 2, "fsdp": 2})


def test_spec_for_shape_fits_the_mesh(mesh222):
  assert sharding.spec_for_shape(("embed", "mlp"), (8, 6), mesh222) == P("fsdp", "tensor")
  # 5 is not divisible by fsdp=2: that dimension stays replicated.
  assert sharding.spec_for_shape(("embed", "mlp"), (5, 6), mesh222) == P(None, "tensor")
  # A mesh axis is used once per array: the second `embed` dimension is replicated.
  assert sharding.spec_for_shape(("embed", "embed"), (8, 8), mesh222) == P("fsdp", None)
  assert sharding.spec_for_shape(("act_batch", None), (8, 3), mesh222) == P(("data", "fsdp"), None)
  assert sharding.spec_for_shape(("act_batch", None), (2, 3), mesh222) == P("data", None)
  assert sharding.spec_for_shape(None, (3,), mesh222) == P()
  dp = sharding.make_mesh({"data": -1})
  assert sharding.spec_for_shape(("embed", "mlp"), (8, 8), dp) == P(None, None)
  with pytest.raises(ValueError, match="logical axis 'bogus' has no rule"):
    sharding.spec_for_shape(("bogus",), (8,), mesh222)
  with pytest.raises(ValueError, match="do not match shape"):
    sharding.spec_for_shape(("embed",), (8, 8), mesh222)


def test_dit_state_shardings_are_fsdp_and_tensor_parallel(mesh222):
  cfg = tf.tiny_config()
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: DiT(cfg.dit, rngs=nnx.Rngs(0)))
  abstract = nnx.state(model, nnx.Param)
  shardings = sharding.state_shardings(abstract, mesh222)
  shapes = nnx.to_pure_dict(abstract)
  sharded = {"fsdp": 0, "tensor": 0}
  for sh, sds in zip(jax.tree.leaves(shardings), jax.tree.leaves(shapes)):
    axes = [a for entry in sh.spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
    assert len(axes) == len(set(axes)), sh.spec
    for dim, entry in zip(sds.shape, sh.spec):
      size = int(np.prod([mesh222.shape[a] for a in ((entry,) if isinstance(entry, str) else entry or ())]))
      assert dim % size == 0
    for a in axes:
      sharded[a] += 1
  assert sharded["fsdp"] > 10 and sharded["tensor"] > 10
  # The stacked layers' attention kernels: layers axis replicated, embed over fsdp, heads over tensor.
  assert shardings["blocks"]["attn"]["q"]["kernel"].spec == P(None, "fsdp", "tensor", None)
  assert shardings["blocks"]["mlp"]["down"]["kernel"].spec == P(None, "tensor", "fsdp")


def test_batch_sharding(mesh222):
  assert sharding.batch_sharding(mesh222, 3).spec == P(("data", "fsdp"), None, None)
  assert sharding.batch_size_multiple(mesh222) == 4


def test_sequence_axis_shards_rows_and_parameters_not_the_batch():
  """`sequence` (optional, like `context`) splits act_seq and, beside fsdp, the parameters; the batch
  stays over data x fsdp. Meshes that do not name it keep their specs (the tests above)."""
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "sequence": 4})
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "sequence": 4, "tensor": 1}
  assert sharding.spec_for_shape(("embed", "mlp"), (8, 6), mesh) == P(("fsdp", "sequence"), None)
  assert sharding.spec_for_shape(("act_batch", "act_seq", "act_embed"), (2, 64, 8), mesh) == P(
      "fsdp", "sequence", None)
  assert sharding.batch_size_multiple(mesh) == 2
  assert sharding.sequence_axis(mesh) == "sequence"
  assert sharding.sequence_axis(sharding.make_mesh({"fsdp": 2, "context": 4})) == "context"
  assert sharding.sequence_axis(sharding.make_mesh({"data": 8})) is None
  with pytest.raises(ValueError, match=r"shards the sequence over \['sequence', 'context'\]"):
    sharding.sequence_axis(sharding.make_mesh({"fsdp": 2, "sequence": 2, "context": 2}))
