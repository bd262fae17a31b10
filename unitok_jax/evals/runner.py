"""`run_evals`: one pass over the eval split feeding one accumulator per eval, and the report it returns.

    model, step = load.load_tokenizer("runs/tiny", config)                  # ours (Orbax) or an official file
    report = run_evals(config, model, ["recon", "fid", "zeroshot"], output_dir="runs/tiny/eval")

Flat report keys:

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

Multi-host: every process calls `run_evals` with the same arguments; each reads its own share of the eval set,
statistics are reduced across processes (collectives in a fixed order), and only process 0 writes files. Params may
be host-local (CLI: each process holds a copy) or global sharded arrays (trainer: the batch is sharded over the
params' mesh). Where the rest lives: config defaults `evals/config.py`, accumulators `evals/accumulators.py`, the
forward `evals/forward.py`, InceptionV3/LPIPS `evals/eval_networks.py`, zero-shot set-up `evals/zeroshot_setup.py`,
the trainer's periodic evals `train/periodic_evals.py`.
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from unitok_jax import paths
from unitok_jax.data import pipeline
from unitok_jax.evals import eval_networks, local_rows
from unitok_jax.evals.accumulators import Accumulator, FidAccumulator, ReconAccumulator, ZeroShotAccumulator
from unitok_jax.evals.config import EVAL_NAMES, data_config_for, eval_batch_size, eval_config, limited, parse_names
from unitok_jax.evals.forward import forward_fn, params_mesh, split_model
from unitok_jax.evals.zeroshot_setup import build_zero_shot
from unitok_jax.parallel import sharding as shd
from unitok_jax.image_grid import save_pair_grid


def _run_pass(loader, num_batches, forward, params, rest, lpips_state, mesh, accumulators):
    for batch in limited(loader, num_batches):
        mask = np.asarray(batch["mask"], bool)
        images = np.asarray(batch["image"], np.float32)
        text = np.asarray(batch["text"], np.int32)
        if mesh is not None:
            g = shd.to_global_batch({"image": images, "text": text}, mesh)
            out = forward(params, rest, lpips_state, g["image"], g["text"])
        else:
            out = forward(params, rest, lpips_state, images, text)
        out = {k: np.asarray(local_rows(v)) for k, v in out.items()}
        local = {"image": images, "label": np.asarray(batch["label"]), "mask": mask}
        for acc in accumulators:
            acc.update(local, out, mask)


def run_evals(
    config: ml_collections.ConfigDict,
    model,
    names: str | Sequence[str] | None = None,
    *,
    step: int | None = None,
    output_dir: str | None = None,
    writer=None,
    num_batches: int | None = None,
    strict: bool = True,
) -> dict[str, float | int | str]:
    """Run the named evals (EVAL_NAMES) and return flat `<name>/<metric>` keys (see module doc).

    model: an nnx tokenizer, or (graphdef, params, rest) as the trainer holds them (params may be mesh-sharded).
    output_dir: where process 0 saves the reconstruction grid (recon/grid = its path); writer: a trainer
    MetricWriter that gets the grid instead (`eval_recon_step*.png`). strict=False turns an eval's exception into
    `<name>/skipped: error: ...` (the trainer's periodic evals) instead of raising.
    Collective when running multi-process: call it on every process with the same arguments.
    """
    t_start = time.time()
    ec = eval_config(config)
    names = parse_names(names if names is not None else ec.names)
    num_batches = int(ec.num_batches if num_batches is None else num_batches)
    graphdef, params, rest = split_model(model)
    mesh = params_mesh(params)
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        rest = jax.device_put(rest, replicated) if jax.tree.leaves(rest) else rest
    report: dict[str, Any] = {}
    tokenizer = nnx.merge(graphdef, params, rest)  # for its interface (models/tokenizer.py); no computation
    has_text, has_clip_head = bool(tokenizer.takes_text), bool(tokenizer.has_clip_head)
    batch_size = eval_batch_size(config, ec, mesh)
    main_data = data_config_for(config)

    def guarded(name, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - strict=False: report, keep training
            if strict:
                raise
            logging.exception("eval %s failed", name)
            report[f"{name}/skipped"] = f"error: {type(e).__name__}: {e}"
            return None

    main_accs: dict[str, Accumulator] = {}
    extra_pass = None
    lpips_graphdef = lpips_state = None
    if "recon" in names:
        lpips_graphdef, lpips_state, lpips_skipped = eval_networks.lpips_network(config, ec, mesh)
        main_accs["recon"] = ReconAccumulator(*tokenizer.code_layout, int(ec.grid_images), lpips_skipped)
    if "fid" in names:
        ev, why = eval_networks.fid_evaluator(config, ec, pipeline.eval_files(main_data), num_batches, batch_size)
        if ev is None:
            report["fid/skipped"] = why
        else:
            main_accs["fid"] = FidAccumulator(ev)
    if "zeroshot" in names:
        if not has_text:
            report["zeroshot/skipped"] = "the model has no text tower (model.text is None)"
        else:
            built = guarded("zeroshot", lambda: build_zero_shot(config, ec, graphdef, params, rest, mesh))
            if built is not None:
                classifier, num_classes, why = built
                if why and not ec.zeroshot.retrieval:
                    report["zeroshot/skipped"] = why
                else:
                    acc = ZeroShotAccumulator(
                        classifier, num_classes, int(ec.zeroshot.retrieval_max), bool(ec.zeroshot.retrieval)
                    )
                    if why:
                        report["zeroshot/classification_skipped"] = why
                    if ec.zeroshot.data_files:
                        extra_pass = acc
                    else:
                        main_accs["zeroshot"] = acc

    with_text = has_text and ("zeroshot" in main_accs or extra_pass is not None)
    forward = forward_fn(graphdef, lpips_graphdef, with_text, mesh, has_clip_head)
    if main_accs:
        main_loader = pipeline.make_eval_loader(main_data, batch_size=batch_size)
        guarded(
            "recon",
            lambda: _run_pass(
                main_loader, num_batches, forward, params, rest, lpips_state, mesh, list(main_accs.values())
            ),
        )
    if extra_pass is not None:
        zs_loader = pipeline.make_eval_loader(data_config_for(config, ec.zeroshot.data_files), batch_size=batch_size)
        guarded(
            "zeroshot",
            lambda: _run_pass(zs_loader, num_batches, forward, params, rest, lpips_state, mesh, [extra_pass]),
        )
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
            suffix = f"_step{int(step):07d}" if step is not None else ""
            path = save_pair_grid(paths.join(output_dir, f"recon_grid{suffix}.png"), recon.grid[0], recon.grid[1])
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


SUMMARY_KEYS = (
    "recon/psnr",
    "recon/ssim",
    "recon/lpips",
    "recon/usage",
    "recon/perplexity",
    "fid/rfid",
    "fid/inception_score",
    "zeroshot/top1",
    "zeroshot/top5",
    "zeroshot/chance",
    "zeroshot/retrieval/image_to_text/R@1",
    "zeroshot/retrieval/text_to_image/R@1",
)


def summary_line(report: Mapping[str, Any]) -> str:
    """One console line: the headline metrics, then which evals were skipped."""
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
