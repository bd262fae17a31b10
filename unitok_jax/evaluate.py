"""Evaluate a tokenizer checkpoint: reconstruction (PSNR/SSIM/LPIPS/codebook usage), rFID/IS, zero-shot + retrieval.

    python -m unitok_jax.evaluate --config=configs/unitok.py:tiny --checkpoint=runs/tiny \\
        --evals=recon,fid,zeroshot --output=runs/tiny/eval/report.json

--checkpoint: a run workdir (latest step), its checkpoints/ dir, a step dir, a step number (with --workdir), or an
official UniTok weight file (.pth through the converter; .npz {official key: array}). The model is built from the
config saved with our checkpoints; --config supplies the data and `eval.*` settings (optional for our checkpoints:
the saved training config is used when it is omitted). Any field can be overridden, e.g.
    --config.eval.fid.inception_path=/weights/pt_inception-2015-12-05-6726825d.pth
    --config.eval.fid.reference_stats=/cache/embedded_eval_stats.npz
    --config.eval.zeroshot.data_files=/data/imagenette_ar --config.eval.zeroshot.class_names=imagenet
    --config.eval.num_batches=10

Writes a JSON report with flat keys (recon/psnr, recon/ssim, recon/usage, zeroshot/top1, zeroshot/chance,
fid/rfid, ...; an eval that cannot run has <name>/skipped with the reason), a reconstruction grid next to it, and
prints both. Multi-process (pods / several GPU hosts): add --distributed (or --coordinator_address, --num_processes,
--process_id for a local rehearsal); every process runs the same command.
"""

from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

from unitok_jax import distributed, paths

_FLAGS: dict = {}


def _define_flags() -> None:
    """CLI flags, defined only when run as a program (importing this module defines none, so it can be imported
    together with other CLIs such as export_codes)."""
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/unitok.py:tiny (data + eval settings).", lock_config=False
    )
    flags.DEFINE_string(
        "checkpoint", None, "Run workdir, checkpoints dir, step dir, step number, or official .pth/.npz."
    )
    flags.DEFINE_string("workdir", None, "Run directory, when --checkpoint is a step number.")
    flags.DEFINE_string("evals", None, "Comma-separated evals: recon,fid,zeroshot (default: config.eval.names).")
    flags.DEFINE_string("output", None, "Path of the JSON report (default: <run>/eval/report_step<N>.json).")
    flags.DEFINE_integer(
        "num_batches", None, "Limit the number of eval batches (default: config.eval.num_batches, 0 = all)."
    )
    distributed.define_flags(flags)
    flags.mark_flags_as_required(["checkpoint"])


def _default_output(checkpoint_path: str, step) -> str:
    if paths.isfile(checkpoint_path):
        return paths.join(paths.parent(checkpoint_path), f"{paths.stem(checkpoint_path)}_eval", "report.json")
    run = paths.parent(paths.parent(checkpoint_path))  # <run>/checkpoints/<step>
    return paths.join(run, "eval", f"report_step{step}.json")


def evaluate(
    config,
    checkpoint: str,
    *,
    workdir: str | None = None,
    evals: str | None = None,
    output: str | None = None,
    num_batches: int | None = None,
) -> dict:
    """Library form of the CLI: load, run, write the report (and grid) and return the report dict."""
    import jax

    from unitok_jax.evals import config as eval_config_lib
    from unitok_jax.evals import runner
    from unitok_jax.load import load_run

    run = load_run(checkpoint, config, workdir=workdir)
    config, path, step = run.config, run.path, run.step
    output = output or _default_output(path, step)
    report = runner.run_evals(
        config, run.model, evals, step=step, output_dir=paths.parent(output), num_batches=num_batches
    )
    report["meta/checkpoint"] = path
    names = evals if evals is not None else eval_config_lib.eval_config(config).names
    report["meta/evals"] = ",".join(eval_config_lib.parse_names(names))
    report["meta/variant"] = str(config.get("variant", ""))
    report["meta/process_count"] = jax.process_count()
    runner.write_report(report, output)
    report["meta/output"] = output
    return report


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import jax

    distributed.initialize_from_flags(FLAGS)
    from unitok_jax.evals import runner

    report = evaluate(
        _FLAGS["config"].value,
        FLAGS.checkpoint,
        workdir=FLAGS.workdir,
        evals=FLAGS.evals,
        output=FLAGS.output,
        num_batches=FLAGS.num_batches,
    )
    if jax.process_index() == 0:
        print(json.dumps(report, indent=2, sort_keys=True))
        print(f"[unitok_jax] {runner.summary_line(report)}")
        print(f"[unitok_jax] report written to {report['meta/output']}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
