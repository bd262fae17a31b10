"""`--workdir=gs://bucket/run` against a real GCS API emulator (fake-gcs-server on 127.0.0.1, tests/gcs_emulator.py):
checkpoints, metrics, TensorBoard events and image grids land in the bucket, nothing lands on the local disk, and
a run SIGKILLed mid-way resumes from the bucket and ends bitwise equal to an uninterrupted local run."""

import json
import os
import signal

import numpy as np
import pytest
from etils import epath

import reliability_config as rc
from gcs_emulator import gcs_emulator  # noqa: F401 — the session fixture

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _committed(url: str) -> list[int]:
    root = epath.Path(url) / "checkpoints"
    if not root.exists():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


def test_gs_workdir_trains_resumes_after_sigkill_bitwise(gcs_emulator, tmp_path):  # noqa: F811
    data_dir = tmp_path / "data"
    rc.build_data(data_dir)
    env = {**rc.subprocess_env(), **gcs_emulator.env}

    local = tmp_path / "local"
    reference = rc.Run(rc.train_args(local, data_dir), str(tmp_path / "reference"), env=env)
    assert reference.finish() == 0, reference.describe()

    url = gcs_emulator.url("run")
    first = rc.Run(rc.train_args(url, data_dir), str(tmp_path / "first"), env=env)
    ready = first.wait_for(lambda: _committed(url) and first.last_step() >= 3)
    assert ready, first.describe()
    first.proc.send_signal(signal.SIGKILL)
    first.finish()
    assert first.proc.returncode == -signal.SIGKILL
    committed = _committed(url)
    assert committed and committed[-1] < rc.TOTAL_STEPS

    second = rc.Run(rc.train_args(url, data_dir), str(tmp_path / "second"), env=env)
    assert second.finish() == 0, second.describe()
    assert rc.resumed_step(second.stdout()) == committed[-1], second.describe()
    assert f"resumed from {url}/checkpoints" in second.stdout()

    # Bitwise: params, optimizer states, discriminator, RNG and counters of the last step.
    got, want = rc.saved_state(url, rc.TOTAL_STEPS), rc.saved_state(local, rc.TOTAL_STEPS)
    assert sorted(got) == sorted(want)
    differing = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not differing, f"{len(differing)} of {len(want)} leaves differ, e.g. {differing[:5]}"

    # Everything else the run writes is in the bucket: one metrics row per step (the killed attempt's rows past
    # the resumed checkpoint were replaced), TensorBoard events, the image grids.
    run = epath.Path(url)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, rc.TOTAL_STEPS + 1))
    local_rows = [json.loads(line) for line in (local / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/loss/total"] == local_rows[-1]["train/loss/total"]
    assert [p.name for p in (run / "tensorboard").iterdir() if p.name.startswith("events.out.tfevents")]
    assert sorted(p.name for p in (run / "images").iterdir()) == sorted(os.listdir(local / "images"))
    assert not os.path.exists(os.path.join(REPO, "gs:"))  # the old bug: a local 'gs:' directory
