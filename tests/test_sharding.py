"""Mesh creation and logical-axis → mesh-axis rules."""

import pytest

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

import unitok_jax  # noqa: F401
from unitok_jax.models import layers
from unitok_jax.parallel import sharding as shd


def test_mesh_shape_fills_minus_one_and_validates():
    assert shd.mesh_shape(dict(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="at most one"):
        shd.mesh_shape(dict(data=-1, fsdp=-1, tensor=1), 8)
    with pytest.raises(ValueError, match="devices"):
        shd.mesh_shape(dict(data=3, fsdp=1, tensor=1), 8)


def test_create_mesh_has_auto_axes():
    mesh = shd.create_mesh(dict(data=2, fsdp=4, tensor=1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_logical_to_mesh_spec_skips_indivisible_and_reuses_no_axis():
    mesh = shd.create_mesh(dict(data=1, fsdp=4, tensor=2))
    rules = shd.resolve_rules("fsdp_tensor")
    assert shd.logical_to_mesh_spec(("embed", "mlp"), (64, 128), mesh, rules) == P("fsdp", "tensor")
    # 6 is not divisible by fsdp=4: that dim stays unsharded and fsdp moves to the next dim that accepts it.
    assert shd.logical_to_mesh_spec(("embed", "mlp"), (6, 128), mesh, rules) == P(None, ("tensor", "fsdp"))
    assert shd.logical_to_mesh_spec(("norm",), (64,), mesh, rules) == P(None)
    assert shd.logical_to_mesh_spec(None, (), mesh, rules) == P()


def test_unknown_rules_preset_and_axis_errors():
    with pytest.raises(ValueError, match="available"):
        shd.resolve_rules("zero3")
    with pytest.raises(ValueError, match="unknown mesh axis"):
        shd.resolve_rules({"embed": "model"})


def test_state_shardings_follow_parameter_annotations():
    mesh = shd.create_mesh(dict(data=2, fsdp=4, tensor=1))
    abstract = nnx.eval_shape(lambda: layers.dense(16, 32, rngs=nnx.Rngs(0)))
    _, params = nnx.split(abstract, nnx.Param)
    shardings = shd.state_shardings(params, mesh, shd.resolve_rules("fsdp"))
    assert shardings["kernel"].value.spec == P("fsdp", None)
    assert shardings["bias"].value.spec == P("fsdp")
    assert shd.replicated_fraction(params, shardings) == 0.0
