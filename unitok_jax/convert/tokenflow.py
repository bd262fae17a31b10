"""Official TokenFlow (ByteFlow-AI/TokenFlow@9812da01) PyTorch state dicts <-> unitok_jax `TokenFlow` params.

`load_tokenflow(path_or_state_dict, config)` builds the model abstractly (no random init) and fills every
parameter from the checkpoint; every checkpoint key is either consumed or on an explicit ignore list
(`quantize.codebook_used`, the usage FIFO; the SigLIP/ViTamin `scaling_layer.*` constant buffers; SigLIP's unused
last block / post_layernorm / MAP head). The ViTamin semantic encoder (`encoder_vqkd.` + timm ViTamin keys) shares
UniTok's ViTamin naming rule (`convert.official.official_param_name`). Missing, unexpected and shape-mismatched keys raise with the key names.
`to_official_state_dict(model)` is the reverse (for a strict `load_state_dict` in the official code).

Layout rules: Linear (out, in) -> kernel (in, out); Conv (O, I, kh, kw) -> (kh, kw, I, O); everything else copied.
HF SigLIP q/k/v projections are packed into our `in_proj` ([q | k | v] columns).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from unitok_jax.convert.official import official_param_name
from unitok_jax.torch_io import load_state_dict
from unitok_jax.models.clip_vit import CLIPViT
from unitok_jax.models.vitamin_semantic import ViTaminSemantic
from unitok_jax.models.init_keys import ShapeOnlyRngs, numpy_fill_
from unitok_jax.models.tokenflow import Teacher, TokenFlow, abstract_tokenflow, semantic_vit
from unitok_jax.models.tokenflow_config import normalize_config

log = logging.getLogger(__name__)

CODEBOOK_USED_LEN = 131072  # official FIFO length (vq_model.py:598), independent of the codebook size

# kind -> (torch arrays -> ours, ours -> torch arrays)
_LINEAR, _CONV, _COPY, _PACK_LINEAR, _PACK_BIAS = "linear", "conv", "copy", "pack_linear", "pack_bias"


def _fwd(kind: str, arrs: list[np.ndarray]) -> np.ndarray:
    if kind == _LINEAR:
        return arrs[0].T
    if kind == _CONV:
        return arrs[0].transpose(2, 3, 1, 0)
    if kind == _COPY:
        return arrs[0]
    if kind == _PACK_LINEAR:
        return np.concatenate([a.T for a in arrs], axis=1)
    if kind == _PACK_BIAS:
        return np.concatenate(arrs, axis=0)
    raise AssertionError(kind)


def _inv(kind: str, arr: np.ndarray, n: int) -> list[np.ndarray]:
    if kind == _LINEAR:
        return [arr.T]
    if kind == _CONV:
        return [arr.transpose(3, 2, 0, 1)]
    if kind == _COPY:
        return [arr]
    if kind == _PACK_LINEAR:
        return [a.T for a in np.split(arr, n, axis=1)]
    if kind == _PACK_BIAS:
        return list(np.split(arr, n, axis=0))
    raise AssertionError(kind)


def _inv_shape(kind: str, shape: tuple, n: int) -> list[tuple]:
    return [a.shape for a in _inv(kind, np.empty(shape, np.float32), n)]


class _Map:
    """Ordered list of entries (torch_keys, our_path, kind)."""

    def __init__(self):
        self.entries: list[tuple[tuple[str, ...], tuple, str]] = []

    def add(self, tkeys, path, kind):
        self.entries.append((tuple([tkeys] if isinstance(tkeys, str) else tkeys), tuple(path), kind))

    def linear(self, tprefix, path, bias=True):
        self.add(tprefix + ".weight", path + ("kernel",), _LINEAR)
        if bias:
            self.add(tprefix + ".bias", path + ("bias",), _COPY)

    def conv(self, tprefix, path, bias=True):
        self.add(tprefix + ".weight", path + ("kernel",), _CONV)
        if bias:
            self.add(tprefix + ".bias", path + ("bias",), _COPY)

    def norm(self, tprefix, path):
        self.add(tprefix + ".weight", path + ("scale",), _COPY)
        self.add(tprefix + ".bias", path + ("bias",), _COPY)


# ---------------------------------------------------------------------------------------------------------------
# Per-module maps
# ---------------------------------------------------------------------------------------------------------------


def _clip_vit_map(m: _Map, vit: CLIPViT, tp: str, path: tuple):
    """OpenAI CLIP visual tower keys (clip/model.py VisionTransformer)."""
    cfg = vit.cfg
    m.conv(tp + "conv1", path + ("conv1",), bias=cfg.patch_bias)
    if cfg.class_token:
        m.add(tp + "class_embedding", path + ("class_embedding",), _COPY)
    m.add(tp + "positional_embedding", path + ("positional_embedding",), _COPY)
    if cfg.ln_pre:
        m.norm(tp + "ln_pre", path + ("ln_pre",))
    for i in range(cfg.num_blocks):
        bp, p = f"{tp}transformer.resblocks.{i}.", path + ("resblocks", i)
        m.norm(bp + "ln_1", p + ("ln_1",))
        m.add(bp + "attn.in_proj_weight", p + ("attn", "in_proj", "kernel"), _LINEAR)
        m.add(bp + "attn.in_proj_bias", p + ("attn", "in_proj", "bias"), _COPY)
        m.linear(bp + "attn.out_proj", p + ("attn", "out_proj"))
        m.norm(bp + "ln_2", p + ("ln_2",))
        m.linear(bp + "mlp.c_fc", p + ("mlp", "c_fc"))
        m.linear(bp + "mlp.c_proj", p + ("mlp", "c_proj"))
    if cfg.ln_post:
        m.norm(tp + "ln_post", path + ("ln_post",))
    if cfg.proj_dim:
        m.add(tp + "proj", path + ("proj",), _COPY)  # raw (width, out) matrix used as x @ proj


def _siglip_vit_map(m: _Map, vit: CLIPViT, tp: str, path: tuple) -> list[str]:
    """HF SiglipVisionTransformer keys (`tp` ends with 'vision_model.'); returns regexes of ignored keys."""
    cfg = vit.cfg
    m.conv(tp + "embeddings.patch_embedding", path + ("conv1",), bias=True)
    m.add(tp + "embeddings.position_embedding.weight", path + ("positional_embedding",), _COPY)
    for i in range(cfg.num_blocks):
        bp, p = f"{tp}encoder.layers.{i}.", path + ("resblocks", i)
        m.norm(bp + "layer_norm1", p + ("ln_1",))
        m.add([bp + f"self_attn.{x}_proj.weight" for x in "qkv"], p + ("attn", "in_proj", "kernel"), _PACK_LINEAR)
        m.add([bp + f"self_attn.{x}_proj.bias" for x in "qkv"], p + ("attn", "in_proj", "bias"), _PACK_BIAS)
        m.linear(bp + "self_attn.out_proj", p + ("attn", "out_proj"))
        m.norm(bp + "layer_norm2", p + ("ln_2",))
        m.linear(bp + "mlp.fc1", p + ("mlp", "c_fc"))
        m.linear(bp + "mlp.fc2", p + ("mlp", "c_proj"))
    ignored = [re.escape(tp) + r"embeddings\.position_ids$"]
    # hidden_states[-2] student: the last block, post_layernorm and the MAP head never run (frozen officially).
    for i in range(cfg.num_blocks, cfg.layers):
        ignored.append(re.escape(f"{tp}encoder.layers.{i}.") + ".*")
    ignored += [re.escape(tp) + r"post_layernorm\..*", re.escape(tp) + r"head\..*"]
    return ignored


def _resnet_map(m, tp, path, blk):
    m.norm(tp + "norm1", path + ("norm1",))
    m.conv(tp + "conv1", path + ("conv1",))
    m.norm(tp + "norm2", path + ("norm2",))
    m.conv(tp + "conv2", path + ("conv2",))
    if blk.nin_shortcut is not None:
        m.conv(tp + "nin_shortcut", path + ("nin_shortcut",))


def _attn_map(m, tp, path):
    m.norm(tp + "norm", path + ("norm",))
    for n in ("q", "k", "v", "proj_out"):
        m.conv(tp + n, path + (n,))


def _cnn_map(m: _Map, cnn, tp: str, path: tuple, resample: str):
    m.conv(tp + "conv_in", path + ("conv_in",))
    for l, level in enumerate(cnn.conv_blocks):
        lp, p = f"{tp}conv_blocks.{l}.", path + ("conv_blocks", l)
        for j, blk in enumerate(level.res):
            _resnet_map(m, f"{lp}res.{j}.", p + ("res", j), blk)
        for j in range(len(level.attn)):
            _attn_map(m, f"{lp}attn.{j}.", p + ("attn", j))
        if getattr(level, resample) is not None:
            m.conv(f"{lp}{resample}.conv", p + (resample, "conv"))
    _resnet_map(m, tp + "mid.0.", path + ("mid", 0), cnn.mid[0])
    _attn_map(m, tp + "mid.1.", path + ("mid", 1))
    _resnet_map(m, tp + "mid.2.", path + ("mid", 2), cnn.mid[2])
    m.norm(tp + "norm_out", path + ("norm_out",))
    m.conv(tp + "conv_out", path + ("conv_out",))


def _beit_map(m: _Map, dec, tp: str, path: tuple):
    m.add(tp + "cls_token", path + ("cls_token",), _COPY)
    m.add(tp + "pos_embed", path + ("pos_embed",), _COPY)
    m.conv(tp + "patch_embed.proj", path + ("patch_embed",))
    for i in range(len(dec.blocks)):
        bp, p = f"{tp}blocks.{i}.", path + ("blocks", i)
        m.norm(bp + "norm1", p + ("norm1",))
        m.add(bp + "attn.qkv.weight", p + ("attn", "qkv", "kernel"), _LINEAR)
        m.add(bp + "attn.q_bias", p + ("attn", "q_bias"), _COPY)
        m.add(bp + "attn.v_bias", p + ("attn", "v_bias"), _COPY)
        m.linear(bp + "attn.proj", p + ("attn", "proj"))
        m.norm(bp + "norm2", p + ("norm2",))
        m.linear(bp + "mlp.fc1", p + ("mlp", "fc1"))
        m.linear(bp + "mlp.fc2", p + ("mlp", "fc2"))
    m.norm(tp + "fc_norm", path + ("fc_norm",))


def _vitamin_map(m: _Map, vit: ViTaminSemantic, tp: str, path: tuple):
    """timm ViTamin keys (`patch_embed.backbone.{stem,stages,pool}.*`, `blocks.N.*`, `norm.*` if built): the same
    names UniTok's official encoder uses under `encoder.`, so the UniTok converter's naming rule is reused."""
    _, params = nnx.split(vit.encoder, nnx.Param)
    for p, var in nnx.to_flat_state(params):
        key, kind = official_param_name(("encoder",) + tuple(p))
        if p[-1] == "kernel":
            kind = {2: _LINEAR, 4: _CONV}[len(var.get_value().shape)]
        m.add(tp + key[len("encoder.") :], path + ("encoder",) + tuple(p), kind)


def _task_map(m: _Map, tp: str, path: tuple):
    m.linear(tp + "0", path + ("fc0",))
    m.linear(tp + "2", path + ("fc2",))


def _siglip_prefix(keys: Iterable[str], base: str) -> str:
    """HF SiglipVisionModel nests everything under `vision_model.`; accept the flattened form too."""
    keys = list(keys)
    if any(k.startswith(base + "vision_model.") for k in keys):
        return base + "vision_model."
    if any(k.startswith(base + "embeddings.") for k in keys):
        return base
    return base + "vision_model."


def tokenflow_key_map(model: TokenFlow, keys: Iterable[str] = ()) -> tuple[_Map, list[str]]:
    """(entries, ignored-key regexes) for a TokenFlow model. `keys` (checkpoint keys) only disambiguate the SigLIP
    prefix."""
    m = _Map()
    ignored = [r"quantize\.codebook_used$", r"scaling_layer\.(shift|scale)$"]
    if model.vit_cfg.kind == "siglip_vit":
        ignored += _siglip_vit_map(m, model.encoder_vqkd, _siglip_prefix(keys, "encoder_vqkd."), ("encoder_vqkd",))
    elif model.vit_cfg.kind == "vitamin":
        _vitamin_map(m, model.encoder_vqkd, "encoder_vqkd.", ("encoder_vqkd",))
    else:
        _clip_vit_map(m, model.encoder_vqkd, "encoder_vqkd.", ("encoder_vqkd",))
    _task_map(m, "encode_task_layer.", ("encode_task_layer",))
    _cnn_map(m, model.encoder, "encoder.", ("encoder",), "downsample")
    m.conv("quant_conv", ("quant_conv",))
    m.add("quantize.embedding_vqkd.weight", ("quantize", "quantizer", "embedding_sem"), _COPY)
    m.add("quantize.embedding_vqgan.weight", ("quantize", "quantizer", "embedding_pix"), _COPY)
    _beit_map(m, model.decoder_vqkd, "decoder_vqkd.", ("decoder_vqkd",))
    _task_map(m, "decode_task_layer.", ("decode_task_layer",))
    m.conv("post_quant_conv", ("post_quant_conv",))
    _cnn_map(m, model.decoder, "decoder.", ("decoder",), "upsample")
    return m, ignored


# ---------------------------------------------------------------------------------------------------------------
# Applying a map
# ---------------------------------------------------------------------------------------------------------------


def _get_var(module, path):
    obj = module
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    if not isinstance(obj, nnx.Variable):
        raise AssertionError(f"{'/'.join(map(str, path))} is not a variable")
    return obj


def _param_paths(module) -> set[tuple]:
    _, state = nnx.split(module, nnx.Param)
    return {tuple(p) for p, _ in nnx.to_flat_state(state)}


def _strip_module_prefix(sd: dict) -> dict:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def apply_key_map(
    module, entries, ignored, sd: Mapping[str, np.ndarray], *, what: str, ignore_unused: bool = False
) -> None:
    """Fill `module`'s params from `sd` following `entries`; raise on missing/unexpected keys and shape mismatches."""
    mapped_paths = {e[1] for e in entries}
    unmapped = _param_paths(module) - mapped_paths
    if unmapped:  # a bug in this converter, not in the checkpoint
        raise AssertionError(f"{what}: model params without a checkpoint key: {sorted(unmapped)[:10]}")
    needed = [k for e in entries for k in e[0]]
    missing = [k for k in needed if k not in sd]
    ign = re.compile("|".join(f"(?:{r})" for r in ignored)) if ignored else None
    needed_set = set(needed)
    unexpected = [k for k in sd if k not in needed_set and not (ign and ign.match(k))]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    if unexpected and not ignore_unused:
        more = " ..." if len(unexpected) > 20 else ""
        problems.append(f"unexpected {len(unexpected)} key(s): {unexpected[:20]}{more}")
    if problems:
        raise KeyError(f"{what} state dict does not match the config: " + "; ".join(problems))
    for tkeys, path, kind in entries:
        var = _get_var(module, path)
        want = tuple(var.get_value().shape)
        exp_shapes = _inv_shape(kind, want, len(tkeys))
        arrs = []
        for k, es in zip(tkeys, exp_shapes):
            a = np.asarray(sd[k])
            if tuple(a.shape) != tuple(es):
                raise ValueError(
                    f"{what}: shape mismatch for '{k}': checkpoint has {tuple(a.shape)}, the config expects {tuple(es)}"
                )
            arrs.append(a.astype(np.float32))
        var.set_value(jnp.asarray(_fwd(kind, arrs), dtype=jnp.float32))


def load_tokenflow(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    config: Mapping[str, Any] | str,
    *,
    subkeys: tuple[str, ...] = ("ema", "model", "state_dict"),
) -> TokenFlow:
    """Official checkpoint (path or {key: array}) + config (fixture `model_config` block, preset name or full
    config) -> `TokenFlow` with every parameter loaded. The first present of `subkeys` is descended into, as the
    official loaders do (ema, then model, then state_dict)."""
    sd = _strip_module_prefix(load_state_dict(path_or_state_dict, subkeys=subkeys))
    cfg = normalize_config(config)
    model = abstract_tokenflow(cfg)
    entries, ignored = tokenflow_key_map(model, sd.keys())
    apply_key_map(model, entries.entries, ignored, sd, what="TokenFlow")
    return model


def to_official_state_dict(model: TokenFlow) -> dict[str, np.ndarray]:
    """Reverse conversion: {official key: float32 numpy array}, including a zero `quantize.codebook_used` buffer so
    that a strict `load_state_dict` in the official code succeeds. (SigLIP variants: the unused last block,
    post_layernorm, MAP head and scaling_layer buffers are not reconstructed.)"""
    entries, _ = tokenflow_key_map(model)
    out: dict[str, np.ndarray] = {}
    for tkeys, path, kind in entries.entries:
        arr = np.asarray(_get_var(model, path).get_value(), np.float32)
        for k, a in zip(tkeys, _inv(kind, arr, len(tkeys))):
            out[k] = np.ascontiguousarray(a)
    out["quantize.codebook_used"] = np.zeros((CODEBOOK_USED_LEN,), np.float32)
    return out


_PATCH_KEY = {
    "clip_vit": "conv1.weight",
    "siglip_vit": "embeddings.patch_embedding.weight",
    "vitamin": "patch_embed.backbone.stem.conv1.weight",
}
_TOWER_NAME = {"clip_vit": "CLIP", "siglip_vit": "SigLIP", "vitamin": "timm ViTamin"}


def load_vit_weights(
    vit: CLIPViT | ViTaminSemantic,
    sd: Mapping[str, np.ndarray],
    *,
    prefixes: tuple[str, ...] = ("visual.", ""),
    ignore_unused: bool = True,
) -> None:
    """Load an OpenAI CLIP visual tower (`visual.*`, with `proj`), an HF SigLIP vision tower (`vision_model.*`) or
    a timm ViTamin (`patch_embed.backbone.*`, `blocks.*`; its `head`/`fc_norm` are ignored) into `vit` in place
    (teacher loading). The first prefix under which the patch-embedding key exists wins."""
    sd = _strip_module_prefix(dict(sd))
    kind = vit.cfg.kind
    probe = _PATCH_KEY[kind]
    prefix = next((p for p in prefixes if p + probe in sd), None)
    if prefix is None:
        raise KeyError(
            f"no '{probe}' under any of the prefixes {prefixes}; is this a {_TOWER_NAME[kind]} vision checkpoint?"
        )
    m = _Map()
    if kind == "siglip_vit":
        ignored = _siglip_vit_map(m, vit, prefix, ())
    elif kind == "vitamin":
        _vitamin_map(m, vit, prefix, ())
        ignored = [re.escape(prefix) + r"(head|fc_norm)\."]
    else:
        ignored = _clip_vit_map(m, vit, prefix, ()) or []
        if not vit.cfg.proj_dim:
            ignored.append(re.escape(prefix) + r"proj$")
    sub = {k: v for k, v in sd.items() if k.startswith(prefix)}
    apply_key_map(vit, m.entries, ignored, sub, what="teacher ViT", ignore_unused=ignore_unused)


# ---------------------------------------------------------------------------------------------------------------
# Pretrained vision towers: the frozen teacher and the student semantic encoder
# ---------------------------------------------------------------------------------------------------------------
_VISION_PREFIXES = ("visual.trunk.", "visual.", "vision_model.", "")


def _read_vision_state_dict(path: str | os.PathLike | Mapping) -> Mapping[str, Any]:
    if isinstance(path, (str, os.PathLike)) and os.fspath(path).endswith(".npz"):
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    return load_state_dict(path, subkeys=("state_dict", "model"))


def load_teacher(path: str | os.PathLike | Mapping | None, cfg: Mapping[str, Any] | str, *, seed: int = 0) -> Teacher:
    """Build the frozen teacher from `cfg['teacher']` (or a preset name) and load weights from `path`.

    `path`: an OpenAI CLIP `.pt/.pth` (keys `visual.*`, torch needed), an `.npz` of the same keys, an HF SigLIP
    vision state dict (`vision_model.*`), a timm ViTamin state dict (`patch_embed.backbone.*`, `blocks.*`; also
    under open_clip's `visual.trunk.`), or a {key: array} mapping. None -> random init with a warning (only for
    smoke tests: distillation against a random teacher is meaningless).
    """
    full = normalize_config(cfg) if isinstance(cfg, str) or "image_size" in cfg else {"teacher": dict(cfg)}
    tcfg = full.get("teacher")
    if tcfg is None:
        raise ValueError("config has no 'teacher' block")
    teacher = nnx.eval_shape(lambda: Teacher(tcfg, rngs=ShapeOnlyRngs()))  # every param is filled below
    if path is None:
        log.warning("load_teacher: no teacher weights given; using a RANDOM %s teacher", tcfg.get("kind", "clip_vit"))
        return numpy_fill_(teacher, seed)
    load_vit_weights(teacher.vit, _read_vision_state_dict(path), prefixes=_VISION_PREFIXES, ignore_unused=True)
    return teacher


def load_semantic_encoder(path: str | os.PathLike | Mapping, cfg: Mapping[str, Any] | str) -> nnx.State:
    """Pretrained weights for the *student* semantic tower (`encoder_vqkd`), as the official code starts from
    `clip.load` / `SiglipVisionModel.from_pretrained` / `timm.create_model(..., pretrained=True)`: the same files
    `load_teacher` reads (keys the student does not build, e.g. CLIP's `proj` or SigLIP's last block, are
    ignored). Returns the `nnx.State` of its params, shaped like `TokenFlow(cfg).encoder_vqkd`."""
    cfg = normalize_config(cfg)
    se = {k: v for k, v in cfg["semantic_encoder"].items() if k != "input_scaling"}
    vit = nnx.eval_shape(lambda: semantic_vit(se, rngs=ShapeOnlyRngs()))
    load_vit_weights(vit, _read_vision_state_dict(path), prefixes=_VISION_PREFIXES, ignore_unused=True)
    _, params = nnx.split(vit, nnx.Param)
    return params
