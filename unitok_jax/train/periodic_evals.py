"""The trainer's hook for evals during training (`config.eval.every_steps`): run them on the live params, log them,
and never let one host's eval failure hang or stop the others."""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from unitok_jax import paths
from unitok_jax.data import pipeline
from unitok_jax.evals import gather_across_processes, sum_across_processes
from unitok_jax.evals.config import data_config_for, eval_config, evals_due
from unitok_jax.evals.runner import run_evals, summary_line


def run_periodic_evals(
    config: ml_collections.ConfigDict,
    step: int,
    params,
    model_rest,
    graphdef,
    writer=None,
    *,
    names: str | Sequence[str] | None = None,
) -> dict[str, Any] | None:
    """Call after a train step on every process; returns None unless `evals_due(config, step)`. When due: runs the
    configured evals on the current params (mesh-sharded is fine), writes `eval/<name>/<metric>` scalars and the
    reconstruction grid through `writer` (a MetricWriter, process 0 writes), prints a one-line summary and
    returns the report. Failures are logged and reported as `<name>/skipped`, never raised."""
    if not evals_due(config, step):
        return None
    # Multi-host: every host must enter the same eval collectives, or the others hang in them. The inputs each host
    # sees (files, weights) are compared first and the evals are skipped on all hosts unless they agree; afterwards
    # a failure on any host counts for all (the same report and metrics everywhere).
    disagreement = hosts_disagree(local_eval_inputs(config))
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
    scalars = {
        f"eval/{k}": v
        for k, v in report.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("meta/")
    }
    scalars["eval/seconds"] = report.get("meta/seconds", 0.0)
    if writer is not None:
        writer.write_scalars(step, scalars)
    if jax.process_index() == 0:
        print(f"[unitok_jax] eval @ step {step}: {summary_line(report)}", flush=True)
        for k, v in report.items():
            if k.endswith("skipped"):
                logging.info("eval %s: %s", k, v)
    return report


def local_eval_inputs(config) -> str:
    """What this host sees of the periodic evals' inputs: eval files and weight files (their existence)."""
    ec = eval_config(config)
    seen = []
    zero_shot = data_config_for(config, ec.zeroshot.data_files) if ec.zeroshot.data_files else None
    for what, data in (("eval data", data_config_for(config)), ("zero-shot data", zero_shot)):
        if data is None:
            continue
        try:
            files = pipeline.eval_files(data)
            seen.append(f"{what}: {len(files)} file(s), missing {[f for f in files if not paths.exists(f)][:3]}")
        except Exception as e:  # noqa: BLE001 - reported as this host's view
            seen.append(f"{what}: {type(e).__name__}: {e}")
    for what, path in (
        ("LPIPS weights", ec.recon.lpips_path or config.get("loss", {}).get("lpips_path", "")),
        ("InceptionV3 weights", ec.fid.inception_path),
        ("FID reference stats", ec.fid.reference_stats),
    ):
        if path:
            seen.append(f"{what} {path}: {'present' if paths.exists(path) else 'missing'}")
    return "; ".join(seen)


def hosts_disagree(local_view: str) -> str:
    """'' when every process sees the same eval inputs, else a message naming a host that differs."""
    if jax.process_count() == 1:
        return ""
    # 6 bytes of the digest: gather_across_processes is exact for integers below 2**48 (jax arrays are 32-bit here).
    digest = np.int64(int.from_bytes(hashlib.sha256(local_view.encode()).digest()[:6], "little"))
    everyone = gather_across_processes(digest).reshape(-1)
    if np.all(everyone == everyone[0]):
        return ""
    odd = int(np.nonzero(everyone != everyone[0])[0][0])
    return (
        f"the hosts see different eval inputs (process {odd} differs from process 0; this process sees: "
        f"{local_view}); make the eval files and weights readable on every host"
    )


def _any_host(flag: bool) -> bool:
    return bool(sum_across_processes(np.int32(flag)) > 0)
