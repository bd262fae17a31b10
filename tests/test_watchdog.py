"""The hang watchdog: a stalled step is detected against the running median, every thread's stack is logged, and
the process exits with watchdog.EXIT_CODE (75) even though its main thread is blocked."""

import subprocess
import sys
import textwrap
import threading
import time

from unitok_jax.train import watchdog


def test_budget_follows_the_median_step_time():
    dog = watchdog.Watchdog(factor=10.0, min_timeout_s=0.5, startup_timeout_s=30.0, on_hang=lambda m: None)
    assert dog.timeout() == 30.0  # start-up: compilation may be long
    dog.pet()  # start-up over; from now on step durations are recorded
    for _ in range(5):
        time.sleep(0.1)
        dog.pet()
    assert 0.9 < dog.timeout() < 1.5  # 10 x ~0.1 s median, above the 0.5 s floor
    dog.long_phase("evals", seconds=12.0)
    assert dog.timeout() == 12.0
    dog.pet()  # the long phase's duration is not a step time
    assert 0.9 < dog.timeout() < 1.5


def test_a_stalled_step_is_reported_with_every_thread_stack():
    reports = []
    dog = watchdog.Watchdog(
        factor=5.0, min_timeout_s=0.3, startup_timeout_s=5.0, poll_s=0.05, on_hang=reports.append
    ).start()
    dog.pet()
    for _ in range(3):
        time.sleep(0.02)
        dog.pet()

    def stuck_in_a_collective():
        time.sleep(3)

    worker = threading.Thread(target=stuck_in_a_collective, name="fake-step")
    worker.start()
    deadline = time.time() + 5
    while not reports and time.time() < deadline:
        time.sleep(0.05)
    dog.stop()
    assert reports, "the watchdog did not fire"
    assert "no progress for" in reports[0] and "train step" in reports[0]
    assert "stuck_in_a_collective" in reports[0]  # the stack of the thread that hangs is in the report
    worker.join()


def test_the_process_exits_with_the_watchdog_code_while_its_main_thread_is_blocked():
    script = textwrap.dedent("""
        import threading
        from unitok_jax.train import watchdog
        dog = watchdog.Watchdog(min_timeout_s=0.5, startup_timeout_s=0.5, poll_s=0.05).start()
        threading.Event().wait()  # blocks forever, like a host waiting in a collective for a dead peer
    """)
    t0 = time.time()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == watchdog.EXIT_CODE, result.stderr[-2000:]
    assert "no progress for" in result.stderr and "MainThread" in result.stderr
    assert time.time() - t0 < 30
