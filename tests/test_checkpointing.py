"""Params-only restore (`init_from`, tools, tests) works across device topologies and reads only `params`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from unitok_jax.train.checkpointing import Checkpointer, RestoreError, restore_params_only


def _save_sharded_state(directory):
    """A state saved from an 8-device mesh, params sharded over all devices (as an FSDP run writes them)."""
    mesh = jax.make_mesh((8,), ("fsdp",))
    sharded = NamedSharding(mesh, P("fsdp"))
    params = {
        "enc": {"w": jax.device_put(jnp.arange(32.0).reshape(16, 2), sharded)},
        "dec": {"b": jax.device_put(jnp.ones((8,), jnp.bfloat16), sharded)},
    }
    state = {"params": params, "opt_state": {"mu": jax.device_put(jnp.zeros((16, 2)), sharded)}, "step": jnp.int32(3)}
    ckpt = Checkpointer(str(directory), async_save=False)
    ckpt.save(3, state, force=True)
    ckpt.close()
    return params


def test_restore_params_only_onto_one_device_and_onto_given_shardings(tmp_path):
    want = _save_sharded_state(tmp_path / "checkpoints")
    # Run dir, checkpoints dir and step dir all resolve to step 3.
    for path in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "3"):
        got = restore_params_only(str(path))
        assert set(got) == {"enc", "dec"}  # only params: no opt_state, no step
        leaf = got["enc"]["w"]
        assert leaf.sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want["enc"]["w"]))
        assert got["dec"]["b"].dtype == jnp.bfloat16

    # Onto another mesh layout (2 x 4, sharded on the second axis), as init_from does for a new run's mesh.
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    sh = NamedSharding(mesh, P("fsdp"))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), want)
    got = restore_params_only(str(tmp_path), abstract)
    assert got["enc"]["w"].sharding == sh
    np.testing.assert_array_equal(np.asarray(got["enc"]["w"]), np.asarray(want["enc"]["w"]))


def test_restore_params_only_names_the_problem(tmp_path):
    with pytest.raises(RestoreError, match="no checkpoint steps found"):
        restore_params_only(str(tmp_path))
    want = _save_sharded_state(tmp_path / "checkpoints")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), want)
    abstract["enc"]["w"] = jax.ShapeDtypeStruct((16, 3), jnp.float32, sharding=device)
    abstract["extra"] = {"k": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=device)}
    with pytest.raises(
        RestoreError, match=r"1 param\(s\) not in the checkpoint: extra/k; shape mismatch: enc/w \(16, 2\)"
    ):
        restore_params_only(str(tmp_path), abstract)


def test_restore_params_only_into_an_nnx_state(tmp_path):
    """The trainer's case: the target is an nnx.State (Variable leaves); the result keeps that structure."""
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([nnx.Linear(2, 3, rngs=nnx.Rngs(0)) for _ in range(2)])

    _, params = nnx.split(Tiny(), nnx.Param)
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    ckpt.save(1, {"params": params}, force=True)
    ckpt.close()
    sh = NamedSharding(jax.make_mesh((8,), ("fsdp",)), P())
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), params)
    got = restore_params_only(str(tmp_path), abstract)
    assert jax.tree.structure(got) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        assert a.sharding == sh
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_single_process_save_compiles_nothing_for_replicated_arrays(tmp_path):
    """One process holds every replica: Orbax's replica-parallel slicing (one compiled slice program per array shape,
    ~15 s per save for the tiny model) must be off; the saved values are unchanged."""
    replicated = NamedSharding(jax.make_mesh((8,), ("data",)), P())
    state = {f"w{i}": jax.device_put(jnp.full((i + 1, 3), float(i)), replicated) for i in range(12)}
    compiles = []

    def listener(event, duration, **kwargs):
        if "backend_compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
        ckpt.save(1, state, force=True)
        ckpt.close()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    back = Checkpointer(str(tmp_path / "ckpt"), async_save=False, read_only=True)
    got = back.restore(1, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state))
    back.close()
    for k in state:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(state[k]))
