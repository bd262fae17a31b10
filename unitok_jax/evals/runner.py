"""Evaluation orchestration shared by the CLI (`python -m unitok_jax.evaluate`), the trainer and the colabs.

    model, step = load_model_from_checkpoint(config, "runs/tiny")          # ours (Orbax) or an official .pth
    report = run_evals(config, model, ["recon", "fid", "zeroshot"], output_dir="runs/tiny/eval")

`run_evals` makes one pass over the eval split (plus one over `eval.zeroshot.data_files` when that names another
dataset) and returns flat keys:

  recon/psnr, recon/ssim            mean over images, [0, 1] data range (evals/image_metrics)
  recon/lpips                       VGG LPIPS, weights from eval.recon.lpips_path or loss.lpips_path (else
                                    recon/lpips_skipped says why)
  recon/usage, recon/usage_official, recon/perplexity, recon/usage/cb{i}, recon/perplexity/cb{i}, ...
                                    codebook statistics over the whole eval set (evals/codebook)
  recon/num_images, recon/grid      number of images; path of the [original | reconstruction] PNG grid
  fid/rfid, fid/inception_score, fid/inception_score_std, fid/num_images, fid/num_reference
                                    rFID of reconstructions vs. originals (reference statistics cached to
                                    eval.fid.reference_stats when set), IS of the reconstructions
  zeroshot/top1, zeroshot/top5, zeroshot/chance, zeroshot/chance_top5, zeroshot/num_classes, zeroshot/count,
  zeroshot/top1_over_chance, zeroshot/retrieval/image_to_text/R@{1,5,10}, .../text_to_image/R@{1,5,10}
An eval that cannot run reports `<name>/skipped` with the reason (no InceptionV3 weights, no text tower, ...).

Multi-host: every process calls `run_evals` / `maybe_run_periodic_evals` with the same arguments; each reads its
own share of the eval set, statistics are reduced across processes (collectives in a fixed order), and only
process 0 writes files. Params may be host-local (CLI: each process holds a copy) or global sharded arrays
(trainer: the batch is sharded over the params' mesh).

Config: `config.eval` (all fields optional, defaults in `default_eval_config`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from unitok_jax import paths
from unitok_jax.evals import concat_across_processes, gather_across_processes, sum_across_processes
from unitok_jax.evals.image_metrics import reconstruction_metrics, to_unit_range

EVAL_NAMES = ("recon", "fid", "zeroshot")
OFFICIAL_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".npz")


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
def default_eval_config() -> ml_collections.ConfigDict:
    """Defaults of `config.eval`; a config without `eval` (or with only some fields) gets these."""
    return ml_collections.ConfigDict(dict(
        every_steps=0,             # training: run the evals every N steps (0 = never during training)
        at_end=True,               # training: also after the last step (when every_steps > 0)
        names="recon,fid,zeroshot",  # comma-separated (or a sequence) of EVAL_NAMES
        batch_size=0,              # global eval batch; 0 = config.eval_batch_size (rounded up to the device count)
        num_batches=0,             # 0 = the whole eval split
        grid_images=16,            # images in the [original | reconstruction] grid (0 = no grid)
        recon=dict(lpips_path=""),  # '' = config.loss.lpips_path; neither -> recon/lpips_skipped
        fid=dict(
            inception_path="",     # pt_inception-2015-12-05-6726825d.pth; '' -> fid/skipped
            reference_stats="",    # .npz cache of the originals' statistics ('' = recompute every time)
            resize_mode="pytorch_fid",  # or 'torch_fidelity' (UniTok's numbers)
            compute_is=True,
            is_splits=10,
        ),
        zeroshot=dict(
            data_files="",         # '' = the eval split of config.data; else ArrayRecord glob/dir/manifest
            class_names="",        # '' = embedded / manifest class_names; 'imagenet'; a .txt path; 'a,b,c'
            templates="",          # '' = auto (embedded prompts / 80 OpenAI templates for imagenet / 'a photo
                                   # of a {}.'); 'openai'; 'simple'; a .txt path; 'a {}.|a photo of a {}.'
            batch_classes=10,
            retrieval=True,        # image<->text recall@1/5/10 on the same batches (captions from the records)
            retrieval_max=5000,    # retrieval uses at most this many (image, caption) pairs
        ),
    ))


def _merge(defaults: Mapping[str, Any], given: Mapping[str, Any] | None, prefix: str) -> dict[str, Any]:
    out = dict(defaults)
    for key, value in (given or {}).items():
        if key not in defaults:
            logging.warning("config.%s%s is not a known eval field (known: %s); ignored", prefix, key, sorted(defaults))
            continue
        if isinstance(defaults[key], Mapping):
            out[key] = _merge(defaults[key], value, f"{prefix}{key}.")
        else:
            out[key] = value
    return out


def eval_config(config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    """`config.eval` completed with `default_eval_config()` (missing fields -> defaults)."""
    given = None
    if config is not None and "eval" in config and config.eval is not None:
        given = config.eval.to_dict() if isinstance(config.eval, ml_collections.ConfigDict) else dict(config.eval)
    return ml_collections.ConfigDict(_merge(default_eval_config().to_dict(), given, "eval."))


def parse_names(names: str | Sequence[str] | None) -> list[str]:
    if names is None:
        return list(EVAL_NAMES)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    out = []
    for n in names:
        if not n:
            continue
        if n not in EVAL_NAMES:
            raise ValueError(f"unknown eval {n!r}; available: {list(EVAL_NAMES)}")
        if n not in out:
            out.append(n)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def resolve_checkpoint(checkpoint: str | int | os.PathLike, workdir: str | None = None) -> str:
    """A step directory (holding `state/`) from: a step number (with `workdir`), a run workdir, its
    `checkpoints/` directory (latest step) or a step directory. Official weight files are returned as is."""
    if isinstance(checkpoint, int) or (isinstance(checkpoint, str) and checkpoint.isdigit()):
        if not workdir:
            raise ValueError(f"checkpoint={checkpoint!r} is a step number: also pass workdir (the run directory)")
        path = paths.join(_checkpoints_dir(workdir), str(int(checkpoint)))
        if not paths.isdir(paths.join(path, "state")):
            raise FileNotFoundError(f"no checkpoint for step {checkpoint} in {_checkpoints_dir(workdir)} "
                                    f"(available: {_steps(_checkpoints_dir(workdir))})")
        return path
    path = paths.resolve(checkpoint)
    if paths.isfile(path):
        return path
    if not paths.isdir(path):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
    if paths.isdir(paths.join(path, "state")):
        return path
    ckpts = _checkpoints_dir(path)
    steps = _steps(ckpts)
    if not steps:
        raise FileNotFoundError(f"no checkpoint steps under {ckpts}")
    return paths.join(ckpts, str(steps[-1]))


def _checkpoints_dir(path: str) -> str:
    sub = paths.join(path, "checkpoints")
    return sub if paths.isdir(sub) else path


def _steps(directory: str) -> list[int]:
    return sorted(int(d) for d in paths.listdir(directory)
                  if d.isdigit() and paths.isdir(paths.join(directory, d, "state")))


def checkpoint_config(step_dir: str) -> ml_collections.ConfigDict | None:
    """The training config saved next to a checkpoint (None when absent)."""
    path = paths.join(step_dir, "config", "metadata")
    if not paths.exists(path):
        return None
    return ml_collections.ConfigDict(paths.read_json(path))


def _model_config_of(config) -> tuple[str, Any]:
    return str(config.get("model_name", "unitok")), config.model


def _abstract_model(model_name: str, model_cfg):
    from unitok_jax.models import build_model

    return nnx.eval_shape(lambda: build_model(model_name, model_cfg, rngs=nnx.Rngs(params=0, dropout=1)))


def _concrete_rest(model_name: str, model_cfg, abstract_rest):
    """Non-Param model state (RNG streams) without initialising the params (XLA drops the unused init)."""
    if not jax.tree.leaves(abstract_rest):
        return abstract_rest
    from unitok_jax.models import build_model

    def rest():
        return nnx.split(build_model(model_name, model_cfg, rngs=nnx.Rngs(params=0, dropout=1)), nnx.Param, ...)[2]

    return jax.jit(rest)()


def _local_sharding():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def restore_params(step_dir: str, abstract_params, sharding=None):
    """Only `state.params` of one of our Orbax checkpoints (no optimizer state read), onto `sharding`
    (default: this process's first device; a tree of shardings is accepted too)."""
    import orbax.checkpoint as ocp

    if sharding is None:
        sharding = _local_sharding()
    if isinstance(sharding, jax.sharding.Sharding):
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_params)
    else:
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params, sharding)
    item = {"params": target}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    restored = ocp.PyTreeCheckpointer().restore(paths.join(step_dir, "state"), args=args)
    return restored["params"]


def load_model_from_checkpoint(config: ml_collections.ConfigDict | None, checkpoint: str | int | os.PathLike,
                               workdir: str | None = None):
    """(UniTok nnx module, step) from one of our checkpoints or an official weight file.

    Ours: `checkpoint` is a run workdir, its checkpoints/ dir, a step dir, or a step number with `workdir`; only the
    params are read. The model is built from the config saved with the checkpoint (so command-line overrides used
    for training need not be repeated); `config` is the fallback when none was saved.
    Official: a `.pth` (needs torch, see convert/torch_io), or an `.npz` {official key: array} (a `param/` prefix
    is stripped, as in tests/fixtures); converted by `convert.official.load_unitok` (config from the checkpoint
    args / tensor shapes, or `config.model` for .npz). The step is None then.
    """
    path = resolve_checkpoint(checkpoint, workdir)
    if paths.isfile(path):
        return _load_official(config, path), None
    saved = checkpoint_config(path)
    source = saved if saved is not None and "model" in saved else config
    if source is None:
        raise ValueError(f"{path} has no saved config: pass the training config")
    model_name, model_cfg = _model_config_of(source)
    if config is not None and saved is not None and "model" in config:
        if json.loads(config.model.to_json_best_effort()) != json.loads(saved.model.to_json_best_effort()):
            logging.warning("config.model differs from the config saved with %s; using the saved one", path)
    abstract = _abstract_model(model_name, model_cfg)
    graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    params = restore_params(path, abs_params)
    rest = _concrete_rest(model_name, model_cfg, abs_rest)
    return nnx.merge(graphdef, params, rest), int(paths.basename(path))


def _load_official(config, path: str):
    from unitok_jax.convert.official import load_unitok

    if path.endswith(".npz"):
        with np.load(paths.local_copy(path)) as z:
            sd = {k: np.asarray(z[k]) for k in z.files}
        if any(k.startswith("param/") for k in sd):
            sd = {k[len("param/"):]: v for k, v in sd.items() if k.startswith("param/")}
        model_cfg = config.model.to_dict() if config is not None and "model" in config else None
        return load_unitok(sd, model_cfg)
    return load_unitok(paths.local_copy(path))


# ----------------------------------------------------------------------------------------------------------------
# Demo checkpoints (colabs, tests)
# ----------------------------------------------------------------------------------------------------------------
def demo_config(base: ml_collections.ConfigDict, *, data_dir: str = "", image_size: int = 32, num_train: int = 64,
                num_eval: int = 32, seed: int = 0) -> ml_collections.ConfigDict:
    """A copy of a tiny UniTok config (`configs/unitok.py:tiny`) shrunk so a CPU compiles it in seconds; the
    embedded dataset is made small too. Used by the colabs and tests to create checkpoints quickly."""
    c = ml_collections.ConfigDict(base.to_dict())
    c.seed = seed
    c.total_steps = max(int(c.total_steps), 1)
    c.async_checkpointing = False
    c.global_batch_size = 8
    c.eval_batch_size = 16
    c.log_every_steps = 1
    c.ckpt_every_steps = 1000
    c.image_every_steps = 1000
    c.data.image_size = image_size
    c.model.image_size = image_size
    c.data.data_dir = data_dir
    c.data.embedded.update(dict(num_train=num_train, num_eval=num_eval, image_size=image_size))
    c.data.context_length = 16
    c.model.text.context_length = 16
    c.model.encoder.update(dict(stage_depths=(1, 1), vit_depth=1))
    c.model.decoder.update(dict(vit_depth=1, inv_mbconv_depths=(1, 1)))
    c.loss.gan = 0.0
    c.loss.lpips = 0.0
    c.eval = default_eval_config()
    c.eval.grid_images = 8
    return c


def create_demo_checkpoint(config: ml_collections.ConfigDict, workdir: str, *, train_steps: int = 0,
                           seed: int | None = None) -> str:
    """Write a checkpoint of `config` into `workdir` and return the workdir.

    train_steps == 0: step 0 with `random_model(config, seed)` params plus optimizer state and counters, saved
    by the trainer's Checkpointer exactly as training saves them — seconds on a CPU (needs loss.gan = 0).
    train_steps > 0: run the trainer for that many steps (the train step compiles for minutes on 2 CPU cores).
    An existing checkpoint of that step is reused.
    """
    from unitok_jax.train import checkpointing, trainer

    ckpts = paths.join(workdir, "checkpoints")
    if train_steps in _steps(ckpts):
        return workdir
    if train_steps > 0:
        c = ml_collections.ConfigDict(config.to_dict())
        c.total_steps = train_steps
        c.ckpt_every_steps = train_steps
        trainer.train(c, workdir)
        return workdir
    state = _initial_train_state(config, int(config.seed) if seed is None else seed)
    ckpt = checkpointing.Checkpointer(ckpts, async_save=False)
    try:
        ckpt.save(0, state, None, json.loads(config.to_json_best_effort()), force=True)
    finally:
        ckpt.close()
    return workdir


def random_model(config: ml_collections.ConfigDict, seed: int = 0):
    """A UniTok of `config.model` with random params filled from a host numpy RNG (`tokenflow.numpy_fill_`:
    N(0, 1/fan_in) kernels, ...; not the training init). About a second on a CPU, where `nnx` init compiles one
    kernel per random op (a minute for the tiny model on 2 cores). For demos and tests."""
    from unitok_jax.models.tokenflow import numpy_fill_

    model_name, model_cfg = _model_config_of(config)
    model = numpy_fill_(_abstract_model(model_name, model_cfg), seed)
    model.logit_scale.set_value(jnp.asarray(math.log(1 / 0.07), jnp.float32))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, params, _concrete_rest(model_name, model_cfg, rest))


def _initial_train_state(config, seed: int):
    """A trainer-format TrainState (params, optimizer state, counters) around `random_model` params."""
    from unitok_jax.train import optimizers
    from unitok_jax.train.state import TrainState, initial_counters

    _, params, _ = nnx.split(random_model(config, seed), nnx.Param, ...)
    tx = optimizers.make_optimizer(config.optimizer, params, config.total_steps)
    disc_params, disc_opt = nnx.State({}), nnx.State({})
    if bool(config.loss.gan) and config.discriminator.name != "none":
        raise ValueError("create_demo_checkpoint(train_steps=0) writes generator-only states: set loss.gan=0")
    return TrainState(params=params, opt_state=jax.jit(tx.init)(params), disc_params=disc_params,
                      disc_opt_state=disc_opt, rng=jax.random.key_data(jax.random.key(seed)), **initial_counters())


# ----------------------------------------------------------------------------------------------------------------
# Model pieces, forward functions
# ----------------------------------------------------------------------------------------------------------------
def _split_model(model):
    """(graphdef, params, rest, model_cfg-or-None) from an nnx module or a (graphdef, params, rest) tuple."""
    if isinstance(model, nnx.Module):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return graphdef, params, rest, getattr(model, "config", None)
    if isinstance(model, (tuple, list)) and len(model) == 3:
        graphdef, params, rest = model
        return graphdef, params, rest, None
    raise TypeError(f"model must be an nnx.Module or (graphdef, params, rest), got {type(model).__name__}")


def _params_mesh(params):
    """The mesh of sharded global params (trainer), or None for host-local params (CLI)."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
        if not getattr(leaf, "is_fully_addressable", True):
            raise ValueError("params span several processes but are not NamedSharding-ed; pass mesh-sharded params")
        return None
    return None


_OUT_NDIM = {"rec": 4, "psnr": 1, "ssim": 1, "indices": 3, "img": 2, "txt": 2, "lpips": 1}


_FORWARD_BY_IDENTITY: dict[tuple, tuple] = {}


def _forward_fn(graphdef, lpips_graphdef, with_text: bool, mesh=None, has_clip_head: bool = True):
    """The jitted eval forward, cached so periodic evals compile once. A TokenFlow graphdef is unhashable (the
    module keeps its config dict), so those are cached by identity (the trainer passes the same object)."""
    args = (graphdef, lpips_graphdef, with_text, mesh, has_clip_head)
    try:
        return _forward_fn_by_value(*args)
    except TypeError:
        key = tuple(id(a) for a in args)
        hit = _FORWARD_BY_IDENTITY.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[0], args)):
            if len(_FORWARD_BY_IDENTITY) >= 8:
                _FORWARD_BY_IDENTITY.pop(next(iter(_FORWARD_BY_IDENTITY)))
            hit = _FORWARD_BY_IDENTITY[key] = (args, _make_forward_fn(*args))
        return hit[1]


@functools.lru_cache(maxsize=8)
def _forward_fn_by_value(graphdef, lpips_graphdef, with_text, mesh, has_clip_head):
    return _make_forward_fn(graphdef, lpips_graphdef, with_text, mesh, has_clip_head)


def _make_forward_fn(graphdef, lpips_graphdef, with_text: bool, mesh, has_clip_head: bool):
    """has_clip_head: UniTok has a CLIP image head; TokenFlow does not (its semantic branch is distilled)."""

    def forward(params, rest, lpips_state, images, text):
        model = nnx.merge(graphdef, params, rest)
        rec, aux = model(images, text, deterministic=True) if with_text else model(images, deterministic=True)
        rec = jnp.clip(rec.astype(jnp.float32), -1.0, 1.0)
        metrics = reconstruction_metrics(images, rec)
        indices = aux["indices"]
        if indices.ndim == 2:  # TokenFlow: one shared index space, [b, tokens of all scales] -> [b, 1, tokens]
            indices = indices[:, None, :]
        out = {"rec": rec, "psnr": metrics["psnr"], "ssim": metrics["ssim"], "indices": indices}
        if has_clip_head:
            out["img"] = aux["clip_image_features"].astype(jnp.float32)
        if with_text:
            out["txt"] = aux["clip_text_features"].astype(jnp.float32)
        if lpips_graphdef is not None:
            out["lpips"] = nnx.merge(lpips_graphdef, lpips_state)(images.astype(jnp.float32), rec)
        return out

    if mesh is None:
        return jax.jit(forward)
    from unitok_jax.parallel import sharding as shd

    keys = ["rec", "psnr", "ssim", "indices"] + (["img"] if has_clip_head else []) + (
        ["txt"] if with_text else []) + (["lpips"] if lpips_graphdef is not None else [])
    # Batch-sharded outputs: each process then reads exactly its own rows (never a replicated global batch).
    return jax.jit(forward, out_shardings={k: shd.batch_sharding(mesh, _OUT_NDIM[k]) for k in keys})


@functools.lru_cache(maxsize=8)
def _encode_text_fn(graphdef):
    def encode(params, rest, ids):
        return nnx.merge(graphdef, params, rest).encode_text(ids).astype(jnp.float32)

    return jax.jit(encode)


def _local_rows(x) -> np.ndarray:
    from unitok_jax.evals.fid import _local_rows as rows

    return np.asarray(rows(x))


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def _eval_batch_size(config, ec, mesh) -> int:
    bs = int(ec.batch_size) or int(config.get("eval_batch_size", 16) or 16)
    multiple = jax.process_count()
    if mesh is not None:
        multiple = math.lcm(multiple, int(mesh.shape.get("data", 1)) * int(mesh.shape.get("fsdp", 1)))
    return -(-bs // multiple) * multiple


def _data_config_for(config, files: str = ""):
    from unitok_jax.data import pipeline

    cfg = pipeline.complete_data_config(config.data)
    if files:
        cfg.name = "array_record"
        cfg.eval_files = files
        if not cfg.train_files:
            cfg.train_files = files
        cfg.sources = []
    return cfg


def _limited(loader, num_batches: int):
    for i, batch in enumerate(loader):
        if num_batches and i >= num_batches:
            break
        yield batch


# ----------------------------------------------------------------------------------------------------------------
# Accumulators: update(local batch, local outputs, mask) per batch, finalize() (collective) at the end
# ----------------------------------------------------------------------------------------------------------------
class _Recon:
    def __init__(self, num_codebooks, codebook_size, grid_images, lpips_skipped):
        from unitok_jax.evals.codebook import CodebookUsage

        self.sums = np.zeros(4, np.float64)  # psnr, ssim, lpips, count
        self.usage = CodebookUsage(num_codebooks, codebook_size)
        self.grid_images = grid_images
        self.grid: tuple[np.ndarray, np.ndarray] | None = None
        self.lpips_skipped = lpips_skipped

    def update(self, batch, out, mask):
        n = int(mask.sum())
        if not n:
            return
        psnr = out["psnr"][mask].astype(np.float64)
        # identical images give inf dB; cap at 100 dB so one perfect image does not make the mean inf
        self.sums[0] += np.minimum(psnr, 100.0).sum()
        self.sums[1] += out["ssim"][mask].astype(np.float64).sum()
        if "lpips" in out:
            self.sums[2] += out["lpips"][mask].astype(np.float64).sum()
        self.sums[3] += n
        self.usage.update(out["indices"][mask])
        if self.grid_images and (self.grid is None or self.grid[0].shape[0] < self.grid_images):
            orig, rec = batch["image"][mask], out["rec"][mask]
            if self.grid is not None:
                orig, rec = np.concatenate([self.grid[0], orig]), np.concatenate([self.grid[1], rec])
            self.grid = (orig[: self.grid_images], rec[: self.grid_images])

    def finalize(self) -> dict[str, Any]:
        sums = sum_across_processes(self.sums)
        n = max(sums[3], 1.0)
        out: dict[str, Any] = {"psnr": sums[0] / n, "ssim": sums[1] / n}
        if self.lpips_skipped:
            out["lpips_skipped"] = self.lpips_skipped
        else:
            out["lpips"] = sums[2] / n
        out.update(self.usage.compute())
        out["num_images"] = int(sums[3])
        return out


class _Fid:
    def __init__(self, evaluator):
        self.ev = evaluator

    def update(self, batch, out, mask):
        if not mask.any():
            return
        rec = np.asarray(to_unit_range(out["rec"][mask]))
        orig = np.asarray(to_unit_range(batch["image"][mask]))
        self.ev.update(rec, reference_images=orig)

    def finalize(self) -> dict[str, Any]:
        res = self.ev.compute()
        if "skipped" in res:
            return {"skipped": res["skipped"]}
        if self.ev.reference is None:
            accum = self.ev.reference_accum.allreduce()  # collective on every process
            if accum.count >= 2:
                self.ev.reference = accum.to_reference(self.ev.reference_fingerprint or "")  # reused next time
        out = {}
        for key, value in res.items():
            out["rfid" if key == "fid" else ("rfid_skipped" if key == "fid_skipped" else key)] = value
        return out


class _ZeroShot:
    def __init__(self, classifier, num_classes, retrieval_max, with_retrieval):
        from unitok_jax.evals.zeroshot import TopKAccumulator

        self.classifier = classifier
        self.num_classes = num_classes
        self.topk = TopKAccumulator((1, 5))
        self.labelled = 0
        self.with_retrieval = with_retrieval
        self.retrieval_max = max(1, retrieval_max // jax.process_count())
        self.img: list[np.ndarray] = []
        self.txt: list[np.ndarray] = []
        self.kept = 0

    def update(self, batch, out, mask):
        from unitok_jax.evals.zeroshot import zero_shot_logits

        labels = np.where(mask, batch["label"], -1)
        if self.classifier is not None and (labels >= 0).any():
            logits = zero_shot_logits(out["img"], self.classifier)
            self.topk.update(logits, labels)
        if self.with_retrieval and "txt" in out and self.kept < self.retrieval_max:
            take = min(int(mask.sum()), self.retrieval_max - self.kept)
            self.img.append(out["img"][mask][:take])
            self.txt.append(out["txt"][mask][:take])
            self.kept += take

    def finalize(self) -> dict[str, Any]:
        from unitok_jax.evals.zeroshot import chance_accuracy, recall_at_k

        out: dict[str, Any] = {}
        if self.classifier is not None:
            acc = self.topk.compute()
            if acc["count"]:
                chance = chance_accuracy(self.num_classes, 1)
                out.update(top1=acc["top1"], top5=acc["top5"], chance=chance,
                           chance_top5=chance_accuracy(self.num_classes, 5), top1_over_chance=acc["top1"] / chance,
                           num_classes=self.num_classes, count=acc["count"])
            else:
                out["classification_skipped"] = "the zero-shot dataset has no labels (label -1 everywhere)"
        if self.with_retrieval:
            dim = self.classifier.shape[0] if self.classifier is not None else (self.img[0].shape[-1] if self.img else 1)
            img = np.concatenate(self.img) if self.img else np.zeros((0, dim), np.float32)
            txt = np.concatenate(self.txt) if self.txt else np.zeros((0, dim), np.float32)
            img, txt = concat_across_processes(img), concat_across_processes(txt)  # collective
            if img.shape[0] >= 2:
                for key, value in recall_at_k(img, txt, (1, 5, 10)).items():
                    out[f"retrieval/{key}"] = value
                out["retrieval/count"] = int(img.shape[0])
        return out


# ----------------------------------------------------------------------------------------------------------------
# Zero-shot set-up
# ----------------------------------------------------------------------------------------------------------------
def _read_list(spec: str, sep: str) -> list[str]:
    if paths.isfile(spec):
        return [line for line in paths.read_text(spec).splitlines() if line.strip()]
    return [s.strip() for s in spec.split(sep) if s.strip()]


def zero_shot_class_names(config, ec=None) -> list[str] | None:
    from unitok_jax.data import pipeline
    from unitok_jax.evals.zeroshot import imagenet_classnames

    ec = ec or eval_config(config)
    spec = str(ec.zeroshot.class_names or "")
    if spec == "imagenet":
        return imagenet_classnames()
    if spec:
        return _read_list(spec, ",")
    return pipeline.class_names(_data_config_for(config, ec.zeroshot.data_files))


def zero_shot_templates(config, ec=None, class_names: Sequence[str] | None = None) -> list[str]:
    from unitok_jax.data import embedded
    from unitok_jax.evals.zeroshot import imagenet_classnames, openai_imagenet_templates

    ec = ec or eval_config(config)
    spec = str(ec.zeroshot.templates or "")
    if spec == "openai":
        return openai_imagenet_templates()
    if spec == "simple":
        return ["a photo of a {}."]
    if spec == "embedded":
        return list(embedded.PROMPT_TEMPLATES)
    if spec:
        return _read_list(spec, "|")
    if class_names is not None and len(class_names) == 1000 and list(class_names) == imagenet_classnames():
        return openai_imagenet_templates()
    if _data_config_for(config, ec.zeroshot.data_files).name == "embedded":
        return list(embedded.PROMPT_TEMPLATES)
    return ["a photo of a {}."]


def _build_zero_shot(config, ec, graphdef, params, rest, mesh) -> tuple[Any, int, str | None]:
    """(classifier [d, C] numpy or None, num classes, reason when classification is skipped)."""
    from unitok_jax.data import text_tokenizer
    from unitok_jax.evals.zeroshot import build_classifier

    names = zero_shot_class_names(config, ec)
    if not names:
        return None, 0, "no class names: set eval.zeroshot.class_names (or use a dataset whose manifest has them)"
    templates = zero_shot_templates(config, ec, names)
    data = _data_config_for(config, ec.zeroshot.data_files)
    tokenizer = text_tokenizer.build_tokenizer(data.tokenizer, context_length=int(data.context_length),
                                               bpe_path=data.bpe_path or None)
    encode = _encode_text_fn(graphdef)
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        to_device = lambda ids: jax.device_put(np.asarray(ids), replicated)  # noqa: E731
    else:
        to_device = np.asarray

    def encode_fn(ids):
        return np.asarray(jax.device_get(encode(params, rest, to_device(ids))))

    classifier = build_classifier(encode_fn, tokenizer, names, templates, batch_classes=int(ec.zeroshot.batch_classes))
    return np.asarray(classifier), len(names), None


# ----------------------------------------------------------------------------------------------------------------
# FID set-up (evaluators are cached: the InceptionV3 is loaded and compiled once per process)
# ----------------------------------------------------------------------------------------------------------------
_FID_CACHE: dict[tuple, Any] = {}


def _fid_evaluator(config, ec, data_files: Sequence[str], num_batches: int, batch_size: int):
    from unitok_jax.evals import fid

    fc = ec.fid
    path = str(fc.inception_path or "")
    if not path:
        return None, fid.SKIP_NO_WEIGHTS
    if not paths.exists(path):
        return None, f"InceptionV3 weights {path!r} do not exist (eval.fid.inception_path)"
    fingerprint = fid.source_fingerprint(
        files=[paths.basename(f) for f in data_files], image_size=int(config.data.image_size),
        num_batches=num_batches, batch_size=batch_size, resize_mode=fc.resize_mode)
    ref_path = paths.resolve(fc.reference_stats) if fc.reference_stats else None
    expected = fingerprint
    if ref_path and paths.exists(ref_path):
        with np.load(paths.local_copy(ref_path), allow_pickle=False) as z:
            if "fingerprint" not in z or not str(z["fingerprint"]):
                expected = None  # external statistics (pytorch-fid / ADM .npz): used as given
    key = (paths.resolve(path), fc.resize_mode, ref_path, expected, bool(fc.compute_is),
           int(fc.is_splits))
    ev = _FID_CACHE.get(key)
    if ev is None:
        try:
            ev = fid.FidEvaluator(paths.local_copy(path), ref_path, resize_mode=fc.resize_mode,
                                  compute_is=bool(fc.compute_is), is_splits=int(fc.is_splits),
                                  reference_fingerprint=expected)
        except ValueError as e:  # stale cache (fingerprint mismatch), bad file
            return None, str(e)
        _FID_CACHE[key] = ev
    ev.reset()
    return ev, None


# ----------------------------------------------------------------------------------------------------------------
# run_evals
# ----------------------------------------------------------------------------------------------------------------
def _lpips_state(config, ec, mesh):
    path = str(ec.recon.lpips_path or "") or str(config.get("loss", {}).get("lpips_path", "") or "")
    if not path:
        return None, None, "no LPIPS weights: set eval.recon.lpips_path (or loss.lpips_path) to lpips_with_vgg.pth"
    if not paths.exists(path):
        return None, None, f"LPIPS weights {path!r} do not exist"
    key = ("lpips", paths.resolve(path))
    if key not in _FID_CACHE:
        from unitok_jax.models.lpips import load_lpips

        _FID_CACHE[key] = nnx.split(load_lpips(paths.local_copy(path)))
    graphdef, state = _FID_CACHE[key]
    if mesh is not None:
        state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return graphdef, state, None


def _quantizer_sizes(config, model_cfg) -> tuple[int, int]:
    """(codebooks, entries per codebook) for the usage statistics; TokenFlow: one shared index space."""
    q = (model_cfg if model_cfg is not None else config.model).quantizer
    return int(q.get("num_codebooks", 1)), int(q["codebook_size"])


def _run_pass(loader, num_batches, forward, params, rest, lpips_state, mesh, accumulators, with_text):
    from unitok_jax.parallel import sharding as shd

    for batch in _limited(loader, num_batches):
        mask = np.asarray(batch["mask"], bool)
        images = np.asarray(batch["image"], np.float32)
        text = np.asarray(batch["text"], np.int32)
        if mesh is not None:
            g = shd.to_global_batch({"image": images, "text": text}, mesh)
            out = forward(params, rest, lpips_state, g["image"], g["text"])
        else:
            out = forward(params, rest, lpips_state, images, text)
        out = {k: _local_rows(v) for k, v in out.items()}
        local = {"image": images, "label": np.asarray(batch["label"]), "mask": mask}
        for acc in accumulators:
            acc.update(local, out, mask)


def run_evals(config: ml_collections.ConfigDict, model, names: str | Sequence[str] | None = None, *,
              step: int | None = None, output_dir: str | None = None, writer=None,
              num_batches: int | None = None, strict: bool = True) -> dict[str, float | int | str]:
    """Run the named evals (EVAL_NAMES) and return flat `<name>/<metric>` keys (see module doc).

    model: an nnx UniTok, or (graphdef, params, rest) as the trainer holds them (params may be mesh-sharded).
    output_dir: where process 0 saves the reconstruction grid (recon/grid = its path); writer: a trainer
    MetricWriter that gets the grid instead (`eval_recon_step*.png`). strict=False turns an eval's exception into
    `<name>/skipped: error: ...` (the trainer's periodic evals) instead of raising.
    Collective when running multi-process: call it on every process with the same arguments.
    """
    from unitok_jax.data import pipeline

    t_start = time.time()
    ec = eval_config(config)
    names = parse_names(names if names is not None else ec.names)
    num_batches = int(ec.num_batches if num_batches is None else num_batches)
    graphdef, params, rest, model_cfg = _split_model(model)
    mesh = _params_mesh(params)
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        rest = jax.device_put(rest, replicated) if jax.tree.leaves(rest) else rest
    report: dict[str, Any] = {}
    has_text = bool((model_cfg if model_cfg is not None else config.model).get("text"))
    has_clip_head = bool((model_cfg if model_cfg is not None else config.model).get("clip"))
    batch_size = _eval_batch_size(config, ec, mesh)

    main_data = _data_config_for(config)

    def guarded(name, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - strict=False: report, keep training
            if strict:
                raise
            logging.exception("eval %s failed", name)
            report[f"{name}/skipped"] = f"error: {type(e).__name__}: {e}"
            return None

    main_accs: dict[str, Any] = {}
    extra_pass = None
    lpips_graphdef = lpips_state = None
    if "recon" in names:
        lpips_graphdef, lpips_state, lpips_skipped = _lpips_state(config, ec, mesh)
        k, kk = _quantizer_sizes(config, model_cfg)
        main_accs["recon"] = _Recon(k, kk, int(ec.grid_images), lpips_skipped)
    if "fid" in names:
        ev, why = _fid_evaluator(config, ec, pipeline.eval_files(main_data), num_batches, batch_size)
        if ev is None:
            report["fid/skipped"] = why
        else:
            main_accs["fid"] = _Fid(ev)
    if "zeroshot" in names:
        if not has_text:
            report["zeroshot/skipped"] = "the model has no text tower (model.text is None)"
        else:
            built = guarded("zeroshot", lambda: _build_zero_shot(config, ec, graphdef, params, rest, mesh))
            if built is not None:
                classifier, num_classes, why = built
                if why and not ec.zeroshot.retrieval:
                    report["zeroshot/skipped"] = why
                else:
                    acc = _ZeroShot(classifier, num_classes, int(ec.zeroshot.retrieval_max), bool(ec.zeroshot.retrieval))
                    if why:
                        report["zeroshot/classification_skipped"] = why
                    if ec.zeroshot.data_files:
                        extra_pass = acc
                    else:
                        main_accs["zeroshot"] = acc

    with_text = has_text and ("zeroshot" in main_accs or extra_pass is not None)
    forward = _forward_fn(graphdef, lpips_graphdef, with_text, mesh, has_clip_head)
    if main_accs:
        main_loader = pipeline.make_eval_loader(main_data, batch_size=batch_size)
        guarded("recon", lambda: _run_pass(main_loader, num_batches, forward, params, rest, lpips_state, mesh,
                                           list(main_accs.values()), with_text))
    if extra_pass is not None:
        zs_loader = pipeline.make_eval_loader(_data_config_for(config, ec.zeroshot.data_files), batch_size=batch_size)
        guarded("zeroshot", lambda: _run_pass(zs_loader, num_batches, forward, params, rest, lpips_state, mesh,
                                              [extra_pass], with_text))
        main_accs["zeroshot"] = extra_pass

    for name in EVAL_NAMES:  # fixed order: the finalize collectives line up across processes
        acc = main_accs.get(name)
        if acc is None or f"{name}/skipped" in report:
            continue
        result = guarded(name, acc.finalize)
        if result is None:
            continue
        for key, value in result.items():
            report[f"{name}/{key}"] = value
    recon = main_accs.get("recon")
    if recon is not None and recon.grid is not None and jax.process_index() == 0:
        if writer is not None:
            path = writer.write_image_grid(step or 0, "eval_recon", recon.grid[0], recon.grid[1])
        elif output_dir:
            from unitok_jax.train.metric_writers import _save_pair_grid

            suffix = f"_step{int(step):07d}" if step is not None else ""
            path = _save_pair_grid(paths.join(output_dir, f"recon_grid{suffix}.png"), recon.grid[0], recon.grid[1])
        else:
            path = None
        if path:
            report["recon/grid"] = path
    report["meta/seconds"] = time.time() - t_start
    if step is not None:
        report["meta/step"] = int(step)
    return {k: _plain(v) for k, v in sorted(report.items())}


def _plain(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return float(v)
    return v


# ----------------------------------------------------------------------------------------------------------------
# Periodic evals inside training
# ----------------------------------------------------------------------------------------------------------------
def evals_due(config: ml_collections.ConfigDict, step: int) -> bool:
    """Cheap check (no I/O): are the periodic evals due after `step`?"""
    ev = config.get("eval") if config is not None else None
    every = int(ev.get("every_steps", 0) or 0) if ev is not None else 0
    if every <= 0:
        return False
    at_end = bool(ev.get("at_end", True))
    return step % every == 0 or (at_end and step == int(config.total_steps))


def maybe_run_periodic_evals(config: ml_collections.ConfigDict, step: int, params, model_rest, graphdef, writer=None,
                             *, names: str | Sequence[str] | None = None) -> dict[str, Any] | None:
    """Call after every train step on every process; returns None unless `evals_due`. When due: runs the
    configured evals on the current params (mesh-sharded is fine), writes `eval/<name>/<metric>` scalars and the
    reconstruction grid through `writer` (a MetricWriter, process 0 writes), prints a one-line summary and
    returns the report. Failures are logged and reported as `<name>/skipped`, never raised."""
    if not evals_due(config, step):
        return None
    # Multi-host: every host must enter the same eval collectives, or the others hang in them. The inputs each host
    # sees (files, weights) are compared first and the evals are skipped on all hosts unless they agree; afterwards
    # a failure on any host counts for all (the same report and metrics everywhere).
    disagreement = _hosts_disagree(_local_eval_inputs(config))
    if disagreement:
        logging.error("periodic evals at step %d skipped on every host: %s", step, disagreement)
        return {"skipped": disagreement}
    try:
        report = run_evals(config, (graphdef, params, model_rest), names, step=step, writer=writer, strict=False)
        failed = ""
    except Exception as e:  # noqa: BLE001 - e.g. no eval split configured: training goes on
        logging.exception("periodic evals at step %d failed", step)
        report, failed = None, f"error: {type(e).__name__}: {e}"
    if _any_host(bool(failed)):
        return {"skipped": failed or "error on another host (see its log)"}
    scalars = {f"eval/{k}": v for k, v in report.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("meta/")}
    scalars["eval/seconds"] = report.get("meta/seconds", 0.0)
    if writer is not None:
        writer.write_scalars(step, scalars)
    if jax.process_index() == 0:
        print(f"[unitok_jax] eval @ step {step}: {summary_line(report)}", flush=True)
        for k, v in report.items():
            if k.endswith("skipped"):
                logging.info("eval %s: %s", k, v)
    return report


def _local_eval_inputs(config) -> str:
    """What this host sees of the periodic evals' inputs: eval files and weight files (their existence)."""
    from unitok_jax.data import pipeline

    ec = eval_config(config)
    seen = []
    for what, data in (("eval data", _data_config_for(config)),
                       ("zero-shot data", _data_config_for(config, ec.zeroshot.data_files) if ec.zeroshot.data_files else None)):
        if data is None:
            continue
        try:
            files = pipeline.eval_files(data)
            seen.append(f"{what}: {len(files)} file(s), missing {[f for f in files if not paths.exists(f)][:3]}")
        except Exception as e:  # noqa: BLE001 - reported as this host's view
            seen.append(f"{what}: {type(e).__name__}: {e}")
    for what, path in (("LPIPS weights", ec.recon.lpips_path or config.get("loss", {}).get("lpips_path", "")),
                       ("InceptionV3 weights", ec.fid.inception_path), ("FID reference stats", ec.fid.reference_stats)):
        if path:
            seen.append(f"{what} {path}: {'present' if paths.exists(path) else 'missing'}")
    return "; ".join(seen)


def _hosts_disagree(local_view: str) -> str:
    """'' when every process sees the same eval inputs, else a message naming a host that differs."""
    if jax.process_count() == 1:
        return ""
    # 6 bytes of the digest: gather_across_processes is exact for integers below 2**48 (jax arrays are 32-bit here).
    digest = np.int64(int.from_bytes(hashlib.sha256(local_view.encode()).digest()[:6], "little"))
    everyone = gather_across_processes(digest).reshape(-1)
    if np.all(everyone == everyone[0]):
        return ""
    odd = int(np.nonzero(everyone != everyone[0])[0][0])
    return (f"the hosts see different eval inputs (process {odd} differs from process 0; this process sees: "
            f"{local_view}); make the eval files and weights readable on every host")


def _any_host(flag: bool) -> bool:
    return bool(sum_across_processes(np.int32(flag)) > 0)


SUMMARY_KEYS = ("recon/psnr", "recon/ssim", "recon/lpips", "recon/usage", "recon/perplexity", "fid/rfid",
                "fid/inception_score", "zeroshot/top1", "zeroshot/top5", "zeroshot/chance",
                "zeroshot/retrieval/image_to_text/R@1", "zeroshot/retrieval/text_to_image/R@1")


def summary_line(report: Mapping[str, Any]) -> str:
    parts = []
    for key in SUMMARY_KEYS:
        if key in report and isinstance(report[key], (int, float)):
            parts.append(f"{key}={report[key]:.4g}")
    for key, value in report.items():
        if key.endswith("/skipped"):
            parts.append(f"{key.split('/')[0]}: skipped")
    return " | ".join(parts)


def write_report(report: Mapping[str, Any], path: str) -> None:
    """Write the report as JSON (process 0 only, atomically; NaN/inf as the JSON extensions NaN/Infinity)."""
    if jax.process_index() != 0:
        return
    paths.write_text_atomic(path, json.dumps(dict(report), indent=2, sort_keys=True, allow_nan=True) + "\n")
