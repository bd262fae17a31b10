"""Device mesh and logical-axis → mesh-axis mapping.

Models name logical axes (`logical_axes.py`); the config's `mesh.rules` maps each to mesh axes
(data, fsdp, tensor). A dimension is sharded only when the mesh axis size divides it, and each mesh axis
is used at most once per array (first matching dimension wins), so any rule set yields valid shardings.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Presets for `config.mesh.rules`: logical axis -> mesh axes tried in order.
RULES_DATA_PARALLEL: dict[str, tuple[str, ...]] = {"batch": BATCH_AXES}
RULES_FSDP: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "embed": ("fsdp",),
    "mlp": ("fsdp",),
    "heads": ("fsdp",),
    "conv_in": ("fsdp",),
    "conv_out": ("fsdp",),
    "codebook": ("fsdp",),
    "vocab": ("fsdp",),
}
RULES_FSDP_TENSOR: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "embed": ("fsdp",),
    "mlp": ("tensor", "fsdp"),
    "heads": ("tensor", "fsdp"),
    "conv_in": ("fsdp",),
    "conv_out": ("tensor", "fsdp"),
    "codebook": ("fsdp",),
    "vocab": ("tensor", "fsdp"),
}
RULE_PRESETS = {"data_parallel": RULES_DATA_PARALLEL, "fsdp": RULES_FSDP, "fsdp_tensor": RULES_FSDP_TENSOR}


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolve the (data, fsdp, tensor) sizes; one of them may be -1 (= all remaining devices)."""
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError("config.mesh: at most one of data/fsdp/tensor may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"config.mesh: {num_devices} devices are not divisible by the fixed axes product {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"config.mesh: data*fsdp*tensor = {int(np.prod(sizes))} but there are {num_devices} devices; use -1 for one axis"
        )
    return tuple(sizes)  # type: ignore[return-value]


def create_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (jax.make_mesh defaults to Explicit on new JAX)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_config, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def resolve_rules(rules: Any) -> dict[str, tuple[str, ...]]:
    """`rules` is a preset name or a mapping logical -> mesh axis / tuple of mesh axes."""
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise ValueError(f"config.mesh.rules: unknown preset {rules!r}; available: {sorted(RULE_PRESETS)}")
        return dict(RULE_PRESETS[rules])
    out = {}
    for name, axes in dict(rules).items():
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        for a in axes:
            if a not in MESH_AXES:
                raise ValueError(f"config.mesh.rules[{name!r}]: unknown mesh axis {a!r}; available: {MESH_AXES}")
        out[name] = axes
    return out


def logical_to_mesh_spec(
    logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules: Mapping[str, tuple[str, ...]]
) -> P:
    """Map one array's logical axes to a PartitionSpec, skipping mesh axes that do not divide the dim."""
    if not logical:
        return P()
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(logical, shape):
        chosen: list[str] = []
        size = 1
        for mesh_axis in rules.get(name, ()) if name else ():
            axis_size = mesh.shape[mesh_axis]
            if mesh_axis in used or axis_size == 1 or dim % (size * axis_size):
                continue
            chosen.append(mesh_axis)
            size *= axis_size
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*spec)


def _logical_specs(abstract_state) -> Any:
    return nnx.get_partition_spec(abstract_state)


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]) -> nnx.State:
    """NamedShardings for an (abstract) nnx.State whose Variables carry logical-axis metadata."""
    specs = _logical_specs(abstract_state)

    def to_sharding(spec, leaf):
        return NamedSharding(
            mesh, logical_to_mesh_spec(tuple(spec) if spec is not None else None, leaf.shape, mesh, rules)
        )

    return jax.tree.map(to_sharding, specs, abstract_state, is_leaf=lambda x: isinstance(x, P))


def compute_shardings(tree: Any, gathered_axes: Sequence[str] = ("fsdp",)) -> Any:
    """Shardings for *using* FSDP-stored arrays: each NamedSharding with `gathered_axes` dropped from its spec
    (tensor-parallel dims stay sharded; None leaves stay None).

    Why: with weights sharded over the same mesh axis as the batch, XLA's SPMD partitioner often keeps the weight
    layout and all-gathers *activations* over the global batch instead (measured: the paper step needed ~380 GiB
    per device). Constraining the weights to these shardings where they are used makes it gather the weights
    (ZeRO-3 storage, data-parallel compute) and keep every activation batch-sharded.
    """

    def drop(sh):
        if not isinstance(sh, NamedSharding):
            return sh
        spec = []
        for entry in sh.spec:
            axes = tuple(a for a in ((entry,) if isinstance(entry, str) else (entry or ())) if a not in gathered_axes)
            spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return NamedSharding(sh.mesh, P(*spec))

    return jax.tree.map(drop, tree, is_leaf=lambda x: isinstance(x, NamedSharding) or x is None)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicated_fraction(params, shardings) -> float:
    """Fraction of parameter bytes that are fully replicated (used by the FSDP coverage test)."""
    total = rep = 0
    for leaf, sh in zip(
        jax.tree.leaves(params), jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    ):
        nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        total += nbytes
        if all(s is None for s in sh.spec):
            rep += nbytes
    return rep / max(total, 1)


def to_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process numpy batch → global jax.Arrays sharded over the batch axes (multi-host safe)."""
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if value.ndim == 0:  # per-process scalars (e.g. counters) are summed on the host instead
            continue
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
    return out
