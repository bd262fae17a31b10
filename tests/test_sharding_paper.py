"""Sharding of the paper config (ViTamin-L UniTok, 820 M params + DINO discriminator heads) on pod-sized meshes.

Everything is abstract (`nnx.eval_shape`, `jax.sharding.AbstractMesh`): no parameter is allocated and the meshes
can be larger than the 8 fake CPU devices of the test session.

The golden file pins the PartitionSpec (and shape) of every trainable parameter on a 16-device FSDP mesh, so an
accidental change of a model's logical `axes=` (or of the rule presets) shows up as a readable diff. Regenerate it
after an intended change with

    python tests/test_sharding_paper.py --regenerate

and review the diff of tests/fixtures/paper_param_shardings.json.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

if __name__ == "__main__":  # the test session gets this from conftest.py
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from train_helpers import ROOT  # noqa: E402  (puts the repo root on sys.path for `configs`)
from configs import unitok as unitok_configs  # noqa: E402
from unitok_jax.models import build_model  # noqa: E402
from unitok_jax.models.discriminators import build_discriminator  # noqa: E402
from unitok_jax.parallel import sharding as shd  # noqa: E402
from unitok_jax.train import optimizers, trainer  # noqa: E402

GOLDEN = ROOT / "tests" / "fixtures" / "paper_param_shardings.json"
GOLDEN_MESH = (1, 16, 1)  # (data, fsdp, tensor)
MAX_REPLICATED = 0.02


def abstract_mesh(shape) -> jax.sharding.AbstractMesh:
    return jax.sharding.AbstractMesh(tuple(shape), shd.MESH_AXES)


def paper_config(scan_blocks: bool = True):
    config = unitok_configs.get_config("paper")
    config.model.scan_blocks = scan_blocks
    return config


def abstract_params(config):
    """(generator params, discriminator params) as abstract nnx.States (ShapeDtypeStruct leaves)."""
    seed = int(config.seed)
    model = nnx.eval_shape(
        lambda: build_model(config.model_name, config.model, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    )
    disc = nnx.eval_shape(
        lambda: build_discriminator(config.discriminator.name, config.discriminator, rngs=nnx.Rngs(params=seed + 2))
    )
    return nnx.state(model, nnx.Param), nnx.state(disc, nnx.Param)


def _spec_json(spec: P) -> list:
    return [list(s) if isinstance(s, tuple) else s for s in spec]


def param_specs(params, mesh, rules) -> dict[str, dict]:
    shardings = shd.state_shardings(params, mesh, rules)
    out = {}
    for (path, var), (_, sh) in zip(nnx.to_flat_state(params), nnx.to_flat_state(shardings)):
        leaf = var.get_value() if isinstance(var, nnx.Variable) else var
        sharding = sh.get_value() if isinstance(sh, nnx.Variable) else sh
        out["/".join(map(str, path))] = {"shape": list(leaf.shape), "spec": _spec_json(sharding.spec)}
    return out


def paper_param_specs() -> dict:
    config = paper_config()
    mesh = abstract_mesh(GOLDEN_MESH)
    rules = shd.resolve_rules(config.mesh.rules)
    gen, disc = abstract_params(config)
    return {
        "_comment": "PartitionSpec of every trainable param of configs/unitok.py:paper on a (data=1, fsdp=16, tensor=1) mesh; "
        "regenerate with: python tests/test_sharding_paper.py --regenerate",
        "mesh": dict(zip(shd.MESH_AXES, GOLDEN_MESH)),
        "rules": config.mesh.rules,
        "generator": param_specs(gen, mesh, rules),
        "discriminator": param_specs(disc, mesh, rules),
    }


def write_golden(path: pathlib.Path = GOLDEN) -> None:
    data = paper_param_specs()
    lines = ["{"]
    head = [f' "{k}": {json.dumps(data[k])},' for k in ("_comment", "mesh", "rules")]
    lines += head
    for i, group in enumerate(("generator", "discriminator")):
        lines.append(f' "{group}": {{')
        items = sorted(data[group].items())
        for j, (name, entry) in enumerate(items):
            comma = "," if j < len(items) - 1 else ""
            lines.append(f'  {json.dumps(name)}: {json.dumps(entry)}{comma}')
        lines.append(" }" + ("," if i == 0 else ""))
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def paper_abstract():
    config = paper_config()
    return config, *abstract_params(config)


@pytest.mark.parametrize("fsdp", [16, 64])
def test_paper_train_state_replicates_under_two_percent(paper_abstract, fsdp):
    """Params, discriminator params and both AdamW states (moments follow their params) on a pod-sized mesh."""
    config, gen, disc = paper_abstract
    mesh = abstract_mesh((1, fsdp, 1))
    rules = shd.resolve_rules(config.mesh.rules)
    gen_sh, disc_sh = shd.state_shardings(gen, mesh, rules), shd.state_shardings(disc, mesh, rules)
    assert shd.replicated_fraction(gen, gen_sh) < MAX_REPLICATED
    assert shd.replicated_fraction(disc, disc_sh) < MAX_REPLICATED

    repl = jax.sharding.NamedSharding(mesh, P())
    total = rep = 0
    for opt_cfg, params, sh in ((config.optimizer, gen, gen_sh), (config.disc_optimizer, disc, disc_sh)):
        tx = optimizers.make_optimizer(opt_cfg, params, config.total_steps)
        opt_state = jax.eval_shape(tx.init, params)
        opt_sh = trainer.optax_param_shardings(tx, opt_state, sh, repl)
        for tree, shardings in ((params, sh), (opt_state, opt_sh)):
            leaves = jax.tree.leaves(tree)
            shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
            assert len(leaves) == len(shs)
            for leaf, s in zip(leaves, shs):
                nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
                total += nbytes
                rep += nbytes if all(p is None for p in s.spec) else 0
    # 820 M params + 2 Adam moments ≈ 9.8 GB fp32; replicated is only norms/biases/tiny projections.
    assert total > 9.5e9
    assert rep / total < MAX_REPLICATED, rep / total


def test_unscanned_paper_model_shards_like_scanned(paper_abstract):
    """scan_blocks only adds a leading (unsharded) depth axis; the replicated fraction must not change."""
    config, gen, _ = paper_abstract
    unscanned, _ = abstract_params(paper_config(scan_blocks=False))
    mesh = abstract_mesh(GOLDEN_MESH)
    rules = shd.resolve_rules(config.mesh.rules)
    a = shd.replicated_fraction(gen, shd.state_shardings(gen, mesh, rules))
    b = shd.replicated_fraction(unscanned, shd.state_shardings(unscanned, mesh, rules))
    assert a == pytest.approx(b) and a < MAX_REPLICATED
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(gen)) == 820_298_692 - 1024  # pos_embed is frozen


def test_paper_param_shardings_match_golden():
    golden = json.loads(GOLDEN.read_text())
    current = paper_param_specs()
    assert current["mesh"] == golden["mesh"] and current["rules"] == golden["rules"]
    for group in ("generator", "discriminator"):
        got, want = current[group], golden[group]
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        changed = [f"{k}: {want[k]} -> {got[k]}" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
        assert not (missing or extra or changed), (
            f"{group} param shardings differ from {GOLDEN.name} (if intended, run "
            f"`python tests/test_sharding_paper.py --regenerate`):\n  missing: {missing[:20]}\n  new: {extra[:20]}\n  "
            + "\n  ".join(changed[:40])
        )
    # The big matrices really are FSDP-sharded (not just "some axis").
    gen = golden["generator"]
    assert gen["encoder/blocks/layers/attn/qkv/kernel"] == {"shape": [31, 1024, 3072], "spec": [None, "fsdp", None]}
    assert gen["text_encoder/token_embedding/embedding"]["spec"][0] == "fsdp"


if __name__ == "__main__":
    if "--regenerate" not in sys.argv[1:]:
        raise SystemExit("usage: python tests/test_sharding_paper.py --regenerate")
    write_golden()
    print(f"wrote {GOLDEN}")
