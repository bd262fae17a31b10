#!/usr/bin/env bash
# Supervised restart loop around ONE command: run it; exit 0 -> done; any other exit (a crash, a killed process,
# the hang watchdog's exit 75, a peer host that died and took the collectives down) -> log it, wait, run the same
# command again. unitok_jax.main resumes from the newest checkpoint in --workdir, so a rerun continues the run.
#
#   launch/supervise.sh .venv/bin/python -m unitok_jax.main --config=configs/unitok.py:tiny --workdir=runs/tiny
#
# Every launcher in launch/ runs its command through this script (the multi-process ones through
# launch/process_group.sh, so one member's failure restarts the whole group).
#
# Signals: SIGTERM / SIGINT / SIGHUP to this script are forwarded to the command as SIGTERM (the trainer's
# "checkpoint after this step and exit 0" signal; SIGINT would be ignored by a background child), and the loop
# then ends with the command's exit code instead of restarting it. Further signals are forwarded too (so a second
# Ctrl-C reaches launch/process_group.sh, which then SIGKILLs members that did not stop).
#
# Environment:
#   MAX_RESTARTS          restarts after the first attempt before giving up (default 100; 0 = never restart)
#   RESTART_DELAY_S       wait before the first restart (default 10); doubles with each consecutive failure
#   RESTART_DELAY_MAX_S   cap of that wait (default 300)
#   RESTART_RESET_S       an attempt that ran at least this long counts as healthy: the wait starts again from
#                         RESTART_DELAY_S (default 1800)
#   MAX_QUICK_FAILURES    give up after this many consecutive attempts that each failed within QUICK_FAILURE_S
#                         (default 10, 0 = never): a typo in a flag (absl exits 1) or a broken install fails at
#                         once every time and should not be retried for hours. A pod whose peers are still
#                         timing out after a crash gets ~25 min of backed-off retries before this triggers.
#   QUICK_FAILURE_S       (default 60)
#   NO_RESTART_CODES      exit codes that mean "this will only fail again", never restarted (default "2 3 4 5 7":
#                         unitok_jax.main's ConfigError, StepMemoryError, WorkdirError, RestoreError,
#                         NonFiniteError; see EXIT_CODES in unitok_jax/main.py). Set to "" to restart on every code.
#   SUPERVISE_LABEL       prefix of this script's log lines (default "supervise")
# The command sees SUPERVISE_ATTEMPT=1,2,... in its environment.
set -euo pipefail

if (($# == 0)); then
  echo "usage: $0 COMMAND [ARGS...]" >&2
  exit 64
fi

MAX_RESTARTS=${MAX_RESTARTS:-100}
RESTART_DELAY_S=${RESTART_DELAY_S:-10}
RESTART_DELAY_MAX_S=${RESTART_DELAY_MAX_S:-300}
RESTART_RESET_S=${RESTART_RESET_S:-1800}
MAX_QUICK_FAILURES=${MAX_QUICK_FAILURES:-10}
QUICK_FAILURE_S=${QUICK_FAILURE_S:-60}
NO_RESTART_CODES=${NO_RESTART_CODES-2 3 4 5 7}
LABEL=${SUPERVISE_LABEL:-supervise}

log() { echo "[$LABEL $(date '+%Y-%m-%d %H:%M:%S')] $*" >&2; }

child=""        # pid of the running attempt (or of the backoff sleep)
signals=0       # how many stop signals arrived
on_signal() {
  signals=$((signals + 1))
  if ((signals == 1)); then log "received SIG$1: forwarding SIGTERM to the command; will not restart it"; fi
  if [[ -n "$child" ]]; then kill -TERM "$child" 2>/dev/null || true; fi
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

# Wait for $child and set rc to its exit code. A trapped signal interrupts `wait` (status > 128) while the child
# is still running, so wait again until the child itself has ended.
wait_child() {
  local seen again
  while :; do
    seen=$signals
    rc=0
    wait "$child" 2>/dev/null || rc=$?
    if ((signals == seen)); then return 0; fi   # wait returned because the child ended
    if ! kill -0 "$child" 2>/dev/null; then
      # The child ended around the signal: collect its real status if `wait` did not already return it.
      again=0
      wait "$child" 2>/dev/null || again=$?
      if ((again != 127)); then rc=$again; fi
      return 0
    fi
  done
}

is_no_restart_code() {
  local c
  for c in $NO_RESTART_CODES; do
    if [[ "$c" == "$1" ]]; then return 0; fi
  done
  return 1
}

attempt=0
quick=0
delay=$RESTART_DELAY_S
while :; do
  attempt=$((attempt + 1))
  export SUPERVISE_ATTEMPT=$attempt
  if ((attempt > 1)); then log "attempt $attempt (restart $((attempt - 1))/$MAX_RESTARTS): $*"; fi
  started=$SECONDS
  "$@" &
  child=$!
  if ((signals > 0)); then kill -TERM "$child" 2>/dev/null || true; fi   # a signal that came just before $!
  wait_child
  child=""
  ran=$((SECONDS - started))

  if ((signals > 0)); then
    log "attempt $attempt exited with code $rc after ${ran} s; stopped by a signal, not restarting"
    exit "$rc"
  fi
  if ((rc == 0)); then
    if ((attempt > 1)); then log "attempt $attempt finished with exit code 0 after ${ran} s"; fi
    exit 0
  fi
  if is_no_restart_code "$rc"; then
    log "attempt $attempt exited with code $rc after ${ran} s; code $rc is in NO_RESTART_CODES ($NO_RESTART_CODES): a" \
        "restart would fail the same way, not restarting"
    exit "$rc"
  fi
  if ((attempt > MAX_RESTARTS)); then
    log "attempt $attempt exited with code $rc after ${ran} s; MAX_RESTARTS=$MAX_RESTARTS reached, giving up"
    exit "$rc"
  fi
  if ((ran < QUICK_FAILURE_S)); then quick=$((quick + 1)); else quick=0; fi
  if ((MAX_QUICK_FAILURES > 0 && quick >= MAX_QUICK_FAILURES)); then
    log "attempt $attempt exited with code $rc after ${ran} s; $quick attempts in a row failed within" \
        "${QUICK_FAILURE_S} s (MAX_QUICK_FAILURES=$MAX_QUICK_FAILURES): a start-up error, giving up"
    exit "$rc"
  fi
  if ((ran >= RESTART_RESET_S)); then delay=$RESTART_DELAY_S; fi
  log "attempt $attempt exited with code $rc after ${ran} s; restarting in ${delay} s" \
      "(restart $attempt/$MAX_RESTARTS; it resumes from the newest checkpoint)"
  # Sleep in the background so that a signal during the wait is seen at once.
  last_rc=$rc
  sleep "$delay" &
  child=$!
  wait_child
  child=""
  rc=$last_rc
  if ((signals > 0)); then
    log "stopped by a signal while waiting to restart; not restarting (last exit code $rc)"
    exit "$rc"
  fi
  delay=$((delay * 2 > RESTART_DELAY_MAX_S ? RESTART_DELAY_MAX_S : delay * 2))
done
