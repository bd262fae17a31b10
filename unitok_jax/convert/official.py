"""Official UniTok PyTorch checkpoint ⇄ unitok_jax `UniTok` parameters.

The key map is derived from our own parameter tree (which mirrors the official module names), so the forward
(official → ours) and reverse (ours → official) directions share one table:
  Linear (out, in) ⇄ kernel (in, out); Conv2d (O, I/g, kh, kw) ⇄ (kh, kw, I/g, O); LayerNorm weight ⇄ scale;
  Embedding weight ⇄ embedding; the 8 per-codebook (K, d) weights ⇄ one stacked (k, K, d) parameter; blocks of a
  scanned stack ⇄ slices of the leading depth axis; `encoder.patch_embed.backbone.*` ⇄ `encoder.{stem,stages,pool}`;
  `text_encoder.transformer.resblocks.N` ⇄ `text_encoder.resblocks.layers[N]`; MHA `in_proj_weight` ⇄ `in_proj.kernel`.
Every official key must be consumed or listed in IGNORED (constant zero buffers and the usage EMA buffers, which our
stateless quantizer does not keep); missing/unexpected keys and shape mismatches raise with the key name.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

import unitok_jax  # noqa: F401  (disables flax eager sharding before any model is built)
from unitok_jax import torch_io
from unitok_jax.models.unitok import PRESETS, UniTok, model_config as preset_config, normalize_config

# Official buffers that carry no learnable information. `MUST_BE_ZERO` ones are checked (a non-zero value would
# change the function); `vocab_usage` is a logging EMA and `attn_mask` a non-persistent causal mask.
IGNORED = (
    r"encoder\.pos_embed",
    r"(quant_proj|post_quant_proj)\.attn\.zero_k_bias",
    r"quantizer\.codebooks\.\d+\.vocab_usage",
    r"text_encoder\.attn_mask",
)
MUST_BE_ZERO = (r"encoder\.pos_embed", r"(quant_proj|post_quant_proj)\.attn\.zero_k_bias")
_IGNORED_RE = re.compile("|".join(f"(?:{p})" for p in IGNORED) + r"\Z")
_ZERO_RE = re.compile("|".join(f"(?:{p})" for p in MUST_BE_ZERO) + r"\Z")
_STACKS = {("encoder", "blocks"), ("decoder", "blocks"), ("text_encoder", "resblocks")}


@dataclasses.dataclass(frozen=True)
class _Entry:
    key: str  # official state-dict key
    path: tuple  # path of our nnx.Param
    index: int | None  # slice of the leading axis (stacked codebooks / scanned blocks), else None
    kind: str  # 'linear' | 'conv' | 'copy'
    shape: tuple  # our (per-slice) shape

    @property
    def official_shape(self) -> tuple:
        if self.kind == "linear":
            return tuple(reversed(self.shape))
        if self.kind == "conv":
            kh, kw, i, o = self.shape
            return (o, i, kh, kw)
        return tuple(self.shape)

    def to_official(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return np.ascontiguousarray(x.T)
        if self.kind == "conv":
            return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
        return x

    def from_official(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return np.ascontiguousarray(x.T)
        if self.kind == "conv":
            return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
        return x


def official_param_name(path: tuple) -> tuple[str, str]:
    """Our (unstacked) param path → (official key, kind)."""
    parts = [str(p) for p in path]
    leaf = parts[-1]
    if parts[0] == "encoder" and parts[1] in ("stem", "stages", "pool"):
        parts = ["encoder", "patch_embed", "backbone"] + parts[1:]
    if parts[0] == "text_encoder" and parts[1] == "resblocks":
        parts = ["text_encoder", "transformer"] + parts[1:]
    parts = [p for p in parts if p != "layers"]  # BlockStack container
    if parts[-2:] == ["in_proj", "kernel"]:
        return ".".join(parts[:-2] + ["in_proj_weight"]), "linear"
    if parts[-2:] == ["in_proj", "bias"]:
        return ".".join(parts[:-2] + ["in_proj_bias"]), "copy"
    if leaf in ("kernel", "scale", "embedding"):  # kernel kind (linear/conv) is set from its ndim in _entries
        parts[-1] = "weight"
    return ".".join(parts), "copy"


def _flat_params(model_or_state) -> list[tuple[tuple, Any]]:
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return list(nnx.to_flat_state(state))


def _value(leaf):
    return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def _entries(model_or_state) -> list[_Entry]:
    """One entry per official key, in our tree order."""
    out = []
    for path, leaf in _flat_params(model_or_state):
        shape = tuple(_value(leaf).shape)
        if path == ("quantizer", "codebooks"):
            for j in range(shape[0]):
                out.append(_Entry(f"quantizer.codebooks.{j}.codebook.weight", path, j, "copy", shape[1:]))
            continue
        stacked = tuple(path[:2]) in _STACKS and len(path) > 3 and path[2] == "layers" and not isinstance(path[3], int)
        slice_shape = shape[1:] if stacked else shape
        key, kind = official_param_name(path)
        if path[-1] == "kernel":
            kind = {2: "linear", 4: "conv"}[len(slice_shape)]
        if stacked:
            prefix = (
                ".".join(str(p) for p in path[:2])
                if path[0] != "text_encoder"
                else "text_encoder.transformer.resblocks"
            )
            rest = key[len(prefix) + 1 :]
            for i in range(shape[0]):
                out.append(_Entry(f"{prefix}.{i}.{rest}", path, i, kind, slice_shape))
        else:
            out.append(_Entry(key, path, None, kind, slice_shape))
    return out


def _buffer_shapes(cfg) -> dict[str, tuple]:
    """Official buffers we do not keep (emitted as zeros by the reverse direction)."""
    out = {"encoder.pos_embed": (1, 1, cfg.encoder.vit_width)}
    for name in ("quant_proj", "post_quant_proj"):
        p = cfg[name]
        out[f"{name}.attn.zero_k_bias"] = (max(p.in_dim, p.out_dim),)
    for j in range(cfg.quantizer.num_codebooks):
        out[f"quantizer.codebooks.{j}.vocab_usage"] = (cfg.quantizer.codebook_size,)
    return out


def official_key_shapes(model: UniTok, *, include_buffers: bool = True) -> dict[str, tuple]:
    """{official key: shape} for `model` (works on an abstract `nnx.eval_shape` model; allocates nothing)."""
    shapes = {e.key: e.official_shape for e in _entries(model)}
    if include_buffers:
        shapes.update(_buffer_shapes(model.config))
    return shapes


def unitok_params_from_state_dict(state_dict: Mapping[str, Any], model: UniTok) -> nnx.State:
    """Official {key: array} → an nnx.State of float32 params with the structure of nnx.state(model, nnx.Param)."""
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    entries = _entries(model)
    expected = {e.key: e for e in entries}
    buffers = _buffer_shapes(model.config)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and not _IGNORED_RE.match(k)]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:20]}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}")
    for k, e in expected.items():
        if k in sd and tuple(sd[k].shape) != e.official_shape:
            problems.append(f"shape mismatch for {k}: checkpoint {tuple(sd[k].shape)} vs model {e.official_shape}")
    for k in sd:
        if k in buffers and tuple(sd[k].shape) != buffers[k]:
            problems.append(f"shape mismatch for {k}: checkpoint {tuple(sd[k].shape)} vs expected {buffers[k]}")
        if _ZERO_RE.match(k) and np.any(sd[k] != 0):
            problems.append(f"{k} is expected to be all zeros (a constant buffer) but is not")
    if problems:
        raise ValueError("UniTok checkpoint does not match the model:\n  " + "\n  ".join(problems))

    by_path: dict[tuple, list[_Entry]] = {}
    for e in entries:
        by_path.setdefault(e.path, []).append(e)
    new_flat = []
    for path, leaf in _flat_params(model):
        group = by_path[path]
        if group[0].index is None:
            value = group[0].from_official(sd[group[0].key])
        else:
            value = np.stack([e.from_official(sd[e.key]) for e in sorted(group, key=lambda e: e.index)])
        value = jnp.asarray(value, jnp.float32)
        new_flat.append((path, leaf.replace(value) if isinstance(leaf, nnx.Variable) else value))
    return nnx.from_flat_state(new_flat)


def to_official_state_dict(model_or_state, config=None, *, include_buffers: bool = True) -> dict[str, np.ndarray]:
    """Ours → official {key: float32 numpy}. Accepts a UniTok, or an nnx.State of params / gradients (then pass
    `config`, needed only for the zero buffers). Emits every official key incl. the zero buffers."""
    cfg = getattr(model_or_state, "config", None) or config
    quantizer_type = cfg["quantizer"].get("type", "mcq") if cfg is not None else "mcq"
    if quantizer_type != "mcq":
        raise ValueError(
            f"quantizer.type={quantizer_type!r}: the official UniTok layout only has the multi-codebook "
            f"quantizer ('mcq'); an RQ-ablation model cannot be exported to it"
        )
    out = {}
    values = {path: _value(leaf) for path, leaf in _flat_params(model_or_state)}
    for e in _entries(model_or_state):
        v = np.asarray(values[e.path], np.float32)
        out[e.key] = e.to_official(v[e.index] if e.index is not None else v)
    if include_buffers:
        cfg = config if config is not None else getattr(model_or_state, "config", None)
        if cfg is None:
            raise ValueError("to_official_state_dict on a bare State needs `config` to emit the zero buffers")
        cfg = normalize_config(cfg) if not hasattr(cfg, "quantizer") else cfg
        for k, shape in _buffer_shapes(cfg).items():
            out[k] = np.zeros(shape, np.float32)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Config selection
# ----------------------------------------------------------------------------------------------------------------
def _config_from_args(args: Mapping[str, Any]):
    name = args.get("model", "vitamin_large")
    if name not in ("vitamin_large", "vitamin_base"):
        raise ValueError(f"checkpoint args name model {name!r}; supported: ['vitamin_base', 'vitamin_large']")
    cfg = preset_config(name).to_dict()
    k = int(args.get("num_codebooks", cfg["quantizer"]["num_codebooks"]))
    width = int(args.get("vocab_width", k * cfg["quantizer"]["codebook_dim"]))
    vocab = int(args.get("vocab_size", k * cfg["quantizer"]["codebook_size"]))
    vit = cfg["encoder"]["vit_width"]
    cfg["quantizer"].update(num_codebooks=k, codebook_size=vocab // k, codebook_dim=width // k)
    cfg["quant_proj"].update(out_dim=width, heads=vit // width)
    cfg["post_quant_proj"].update(in_dim=width, heads=vit // width)
    cfg["image_size"] = int(args.get("img_size", cfg["image_size"]))
    if "embed_dim" in args:
        cfg["clip"]["embed_dim"] = int(args["embed_dim"])
    text = cfg["text"]
    for ours, theirs in (
        ("width", "text_width"),
        ("heads", "text_heads"),
        ("layers", "text_layers"),
        ("vocab_size", "text_vocab_size"),
        ("context_length", "text_context_length"),
    ):
        if theirs in args:
            text[ours] = int(args[theirs])
    return cfg


def _config_from_shapes(sd: Mapping[str, np.ndarray]):
    """Released preset chosen by the encoder width; quantizer / CLIP / text sizes read from the tensors."""
    key = "encoder.blocks.0.attn.qkv.weight"
    if key not in sd:
        raise ValueError(f"cannot infer the UniTok config: {key!r} not in the state dict; pass model_config")
    width = sd[key].shape[1]
    names = [n for n in ("vitamin_large", "vitamin_base") if PRESETS[n]["encoder"]["vit_width"] == width]
    if not names:
        raise ValueError(f"cannot infer the UniTok config from encoder width {width}; pass model_config")
    cfg = preset_config(names[0]).to_dict()
    cbs = sorted(
        int(m.group(1)) for k in sd if (m := re.fullmatch(r"quantizer\.codebooks\.(\d+)\.codebook\.weight", k))
    )
    if cbs:
        K, d = sd["quantizer.codebooks.0.codebook.weight"].shape
        k = len(cbs)
        cfg["quantizer"].update(num_codebooks=k, codebook_size=int(K), codebook_dim=int(d))
        cfg["quant_proj"].update(out_dim=k * d, heads=width // (k * d))
        cfg["post_quant_proj"].update(in_dim=k * d, heads=width // (k * d))
    if "projection.weight" in sd:
        cfg["clip"]["embed_dim"] = int(sd["projection.weight"].shape[0])
    if "text_encoder.token_embedding.weight" in sd:
        vocab, tw = sd["text_encoder.token_embedding.weight"].shape
        layers = len({m.group(1) for k in sd if (m := re.match(r"text_encoder\.transformer\.resblocks\.(\d+)\.", k))})
        cfg["text"].update(
            width=int(tw),
            vocab_size=int(vocab),
            layers=layers,
            heads=max(1, int(tw) // 64),
            context_length=int(sd["text_encoder.positional_embedding"].shape[0]),
        )
    else:
        cfg["text"] = None
    return cfg


def _resolve_config(model_config, sd, args):
    if isinstance(model_config, str):
        return preset_config(model_config).to_dict()
    if model_config is not None:
        return model_config
    if args:
        return _config_from_args(args)
    return _config_from_shapes(sd)


def build_abstract(cfg) -> UniTok:
    """A UniTok whose params are ShapeDtypeStructs (no memory, no init compute)."""
    return nnx.eval_shape(lambda: UniTok(cfg, rngs=nnx.Rngs(0)))


def load_unitok(path_or_state_dict, model_config=None, **config_overrides) -> UniTok:
    """Build a UniTok from an official checkpoint.

    `path_or_state_dict`: a .pth path (reads ckpt['trainer']['unitok'] and ckpt['args']), a full checkpoint dict, or
    a {official key: array} dict. `model_config`: None (from ckpt args, else inferred from tensor shapes), a preset
    name, or a config mapping such as the fixtures' `model_config` block. `config_overrides` set the optional
    extras (dtype, scan_blocks, remat, drop_path_rate).
    """
    obj = path_or_state_dict
    if isinstance(obj, (str, os.PathLike)):
        obj = torch_io.load_torch_file(obj)
    args = None
    if isinstance(obj, Mapping) and "trainer" in obj:
        args = obj.get("args")
        if args is not None and not isinstance(args, Mapping):
            args = dict(args)
    sd = torch_io.load_state_dict(obj, subkeys=("trainer", "unitok"))
    cfg = dict(normalize_config(_resolve_config(model_config, sd, args)).to_dict())
    cfg.update(config_overrides)
    cfg = normalize_config(cfg)
    model = build_abstract(cfg)
    params = unitok_params_from_state_dict(sd, model)
    nnx.update(model, params)
    if model.drop_rngs is not None:  # the abstract Rngs would carry no key
        model.drop_rngs = nnx.Rngs(dropout=0)
    return model


def param_count(model: UniTok) -> int:
    """Number of parameters (works on abstract models)."""
    return int(sum(math.prod(_value(v).shape) for _, v in _flat_params(model)))
