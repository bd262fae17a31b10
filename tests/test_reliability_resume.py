"""Issue 4 (reliability), exact resume: `python -m unitok_jax.main` killed with SIGKILL at arbitrary points (also in
the middle of an async checkpoint save), stopped with SIGTERM (preemption), or restarted over a damaged newest
checkpoint ends with a TrainState bitwise equal to an uninterrupted run's, losing only the steps since the last
checkpoint. Every run is a real subprocess on one CPU device with the micro config of tests/reliability_config.py;
a shared persistent compilation cache makes the restarts cheap (the first run pays the compile).
"""

import os
import random
import re
import shutil
import signal
import time

import numpy as np
import pytest

import reliability_config as rc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("reliability_data")
    rc.build_data(path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The uninterrupted run (also warms the compilation cache for the restarts)."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    run = rc.Run(rc.train_args(workdir, data_dir), str(workdir) + "_log")
    assert run.finish() == 0, run.describe()
    assert "started from scratch" in run.stdout(), run.describe()
    assert rc.committed_steps(workdir)[-1] == rc.TOTAL_STEPS
    return workdir, rc.saved_state(workdir, rc.TOTAL_STEPS)


def _assert_same_state(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    differing = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not differing, f"{len(differing)} of {len(want)} state leaves differ, e.g. {differing[:5]}"


def _wait_then(run: rc.Run, ready, action, what: str):
    assert run.wait_for(ready), f"never reached: {what}\n{run.describe()}"
    action()


def test_sigkill_and_sigterm_restarts_resume_bitwise(reference, data_dir, tmp_path):
    """One workdir, restarted with the same command after each interruption, ends equal to the reference."""
    ref_dir, ref_state = reference
    workdir = tmp_path / "run"
    args = rc.train_args(workdir, data_dir)
    rnd = random.Random(4)  # the extra delays make the kill points arbitrary but reproducible in intent
    trials = []
    newest_expected = 0  # newest committed checkpoint when the previous process died

    def start(i):
        if i == 1:  # the same command, with each async save's commit held back 3 s so the kill surely lands in one
            return rc.Run(
                args, str(tmp_path / f"attempt{i}"), python_code=rc.DRIVER, env={"RELIABILITY_SLOW_COMMIT_S": "3"}
            )
        return rc.Run(args, str(tmp_path / f"attempt{i}"))

    def check_resumed(run, i):
        # The restart must say where it resumed: exactly the newest committed checkpoint at the time of the kill.
        assert run.wait_for(lambda: "training steps" in run.stdout()), run.describe()
        got = rc.resumed_step(run.stdout())
        if newest_expected == 0:
            assert "started from scratch" in run.stdout(), run.describe()
        else:
            assert got == newest_expected, (
                f"attempt {i}: resumed at {got}, newest good checkpoint {newest_expected}\n{run.describe()}"
            )

    # 1) SIGKILL a few steps after the first checkpoint is committed (mid-step, mid-logging or mid-save).
    # 2) SIGKILL the moment a later async save is in flight ('<step>.orbax-checkpoint-tmp*' exists).
    # 3) SIGKILL right after a checkpoint is committed (+ a random delay).
    # 4) SIGTERM (preemption): the step finishes, a checkpoint is written, the process exits 0.
    # 5) run to completion.
    for i in range(5):
        run = start(i)
        check_resumed(run, i)
        if i == 0:
            _wait_then(
                run,
                lambda: rc.committed_steps(workdir) and run.last_step() >= 3,
                lambda: time.sleep(rnd.uniform(0, 0.3)),
                "step 3",
            )
            kind = "SIGKILL after step 3 + random delay"
        elif i == 1:
            target = max(rc.committed_steps(workdir) or [0]) + 4  # not the first save after the restart
            _wait_then(
                run,
                lambda: any(int(d.split(".")[0]) >= target for d in rc.in_flight_saves(workdir)),
                lambda: None,
                f"the save of step {target} in flight",
            )
            kind = f"SIGKILL during the async save of step {target}"
        elif i == 2:
            target = max(rc.committed_steps(workdir) or [0]) + 2
            _wait_then(
                run,
                lambda: max(rc.committed_steps(workdir) or [0]) >= target,
                lambda: time.sleep(rnd.uniform(0, 0.3)),
                f"checkpoint {target}",
            )
            kind = f"SIGKILL after checkpoint {target} + random delay"
        elif i == 3:
            target = run.last_step() + 3
            _wait_then(run, lambda: run.last_step() >= target, lambda: None, f"step {target}")
            kind = "SIGTERM"
        else:
            assert run.finish() == 0, run.describe()
            trials.append(dict(kind="completion", resumed_at=newest_expected))
            break
        in_flight = rc.in_flight_saves(workdir)
        step_at_signal = run.last_step()
        assert run.proc.poll() is None, f"attempt {i} ended before it could be interrupted\n{run.describe()}"
        if kind == "SIGTERM":
            run.proc.send_signal(signal.SIGTERM)
            assert run.finish(timeout=300) == 0, run.describe()
            match = re.search(r"preempted at step (\d+): checkpoint written; exiting cleanly", run.stdout())
            assert match, run.describe()
            stopped = int(match.group(1))
            assert stopped >= step_at_signal and stopped in rc.committed_steps(workdir), run.describe()
            assert not rc.in_flight_saves(workdir), "the async save must be finished before exiting"
        else:
            run.proc.send_signal(signal.SIGKILL)
            run.finish(timeout=60)
            assert run.proc.returncode == -signal.SIGKILL
        newest_expected = max(rc.committed_steps(workdir) or [0])
        trials.append(
            dict(
                kind=kind,
                step_at_signal=step_at_signal,
                save_in_flight=bool(in_flight),
                newest_checkpoint=newest_expected,
                lost_steps=max(step_at_signal - newest_expected, 0),
            )
        )
        if kind == "SIGTERM":
            assert newest_expected == stopped  # nothing lost on preemption
    print("trials:", trials)
    assert any(t.get("save_in_flight") for t in trials), trials
    _assert_same_state(rc.saved_state(workdir, rc.TOTAL_STEPS), ref_state)


def test_damaged_newest_checkpoint_falls_back_and_still_matches(reference, data_dir, tmp_path):
    """Truncate an array file of the newest checkpoint (+ drop another's commit marker): the rerun warns, resumes
    from the previous good one, moves the damaged ones aside, re-trains the lost steps and ends bit-identical."""
    ref_dir, ref_state = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    ckpts = os.path.join(workdir, "checkpoints")
    steps = rc.committed_steps(workdir)
    assert len(steps) >= 3, steps
    newest, second, good = steps[-1], steps[-2], steps[-3]
    arrays = [
        os.path.join(r, f)
        for r, _, fs in os.walk(os.path.join(ckpts, str(newest), "state"))
        for f in fs
        if os.path.basename(r) == "d"
    ]
    biggest = max(arrays, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    os.remove(os.path.join(ckpts, str(second), "commit_success.txt"))  # as if the save died before its commit

    run = rc.Run(rc.train_args(workdir, data_dir), str(tmp_path / "rerun"))
    assert run.finish() == 0, run.describe()
    assert rc.resumed_step(run.stdout()) == good, run.describe()
    assert f"skipped damaged checkpoint(s) [{newest}, {second}]" in run.stdout()
    assert f"checkpoint at step {newest}" in run.stderr() and "is damaged" in run.stderr()
    assert sorted(os.listdir(ckpts + ".damaged")) == sorted([str(newest), str(second)])
    _assert_same_state(rc.saved_state(workdir, rc.TOTAL_STEPS), ref_state)


def test_random_sigkills_resume_bitwise(reference, data_dir, tmp_path):
    """Opt-in stress: UNITOK_RELIABILITY_KILLS=N SIGKILLs at random steps (random sub-step delay too), restarting
    after each, then a run to completion; seed UNITOK_RELIABILITY_SEED. Skipped unless N > 0 (CI time)."""
    kills = int(os.environ.get("UNITOK_RELIABILITY_KILLS", "0"))
    if kills <= 0:
        pytest.skip("set UNITOK_RELIABILITY_KILLS=N to run N random SIGKILL trials")
    rnd = random.Random(int(os.environ.get("UNITOK_RELIABILITY_SEED", "0")))
    ref_dir, ref_state = reference
    workdir = tmp_path / "run"
    args = rc.train_args(workdir, data_dir)
    trials, newest = [], 0
    for i in range(kills + 1):
        run = rc.Run(args, str(tmp_path / f"attempt{i}"))
        assert run.wait_for(lambda: "training steps" in run.stdout()), run.describe()
        assert (rc.resumed_step(run.stdout()) or 0) == newest, run.describe()
        if i == kills or newest >= rc.TOTAL_STEPS:
            assert run.finish() == 0, run.describe()
            break
        target = min(newest + rnd.randint(1, 8), rc.TOTAL_STEPS - 1)  # 1-8 steps past the resume point
        run.wait_for(lambda: run.last_step() >= target)
        time.sleep(rnd.uniform(0, 0.3))
        in_flight, at = bool(rc.in_flight_saves(workdir)), run.last_step()
        if run.proc.poll() is not None:  # finished before the kill landed
            assert run.finish() == 0, run.describe()
            trials.append(dict(target=target, killed=False))
            newest = rc.TOTAL_STEPS
            continue
        run.proc.send_signal(signal.SIGKILL)
        run.finish(timeout=60)
        newest = max(rc.committed_steps(workdir) or [0])
        # Lost: the steps since the newest *committed* checkpoint. With async saves the newest may still be in
        # flight (a save waits for the previous one), so that is at most two checkpoint intervals.
        assert at - newest <= 2 * rc.get_config().ckpt_every_steps, (at, newest)
        trials.append(dict(target=target, step_at_kill=at, save_in_flight=in_flight, resumed_next_at=newest))
    print(f"random kill trials ({len(trials)}):", trials)
    _assert_same_state(rc.saved_state(workdir, rc.TOTAL_STEPS), ref_state)
