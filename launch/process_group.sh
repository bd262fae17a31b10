#!/usr/bin/env bash
# Run GROUP_SIZE copies of one command on this machine as one group, like `srun --kill-on-bad-exit`: when any
# member exits non-zero the others are stopped (a survivor would otherwise wait in a collective for a peer that is
# gone), and the group exits with that member's code. Exit 0 when every member exits 0.
#
#   GROUP_SIZE=2 launch/process_group.sh .venv/bin/python -m unitok_jax.main --config=... --workdir=... \
#       --coordinator_address=localhost:{port} --num_processes=2 --process_id={rank}
#
# In every argument, per member i (0 <= i < GROUP_SIZE):
#   {rank}        -> GROUP_RANK_OFFSET + i (the global process id)
#   {local_rank}  -> i (e.g. --local_device_ids={local_rank})
#   {port}        -> one free localhost TCP port, picked anew each time this script runs (so a restarted group
#                    never collides with the previous coordinator's socket)
# Members also get GROUP_RANK / GROUP_LOCAL_RANK / GROUP_SIZE in their environment.
#
# Output: member i appends to $GROUP_LOGDIR/p<rank>.log (one "=== ..." header per run); member 0's output also
# goes to this script's stdout. Used under launch/supervise.sh, so a failed group is restarted as a whole.
#
# Environment:
#   GROUP_SIZE            number of members (required)
#   GROUP_RANK_OFFSET     rank of member 0 (default 0; HOST_INDEX * processes-per-host on several hosts)
#   GROUP_LOGDIR          log folder (default ./group_logs)
#   GROUP_KILL_GRACE_S    after a member failed: seconds between SIGTERM and SIGKILL to the others (default 5)
#   GROUP_PYTHON          python used to find a free port (default python3)
# SIGTERM/SIGINT/SIGHUP to this script: forwarded to every member as SIGTERM (the trainer checkpoints and exits 0);
# then the script waits for them. A second signal SIGKILLs the members that are still running.
set -euo pipefail

if (($# == 0)); then
  echo "usage: GROUP_SIZE=N $0 COMMAND [ARGS...]   ({rank}, {local_rank}, {port} are substituted)" >&2
  exit 64
fi
: "${GROUP_SIZE:?set GROUP_SIZE (number of processes)}"
OFFSET=${GROUP_RANK_OFFSET:-0}
LOGDIR=${GROUP_LOGDIR:-./group_logs}
GRACE=${GROUP_KILL_GRACE_S:-5}
mkdir -p "$LOGDIR"

log() { echo "[process_group $(date '+%Y-%m-%d %H:%M:%S')] $*" >&2; }

port=""
if [[ "$*" == *"{port}"* ]]; then
  port=$("${GROUP_PYTHON:-python3}" -c \
    'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
fi

pids=()
stopping=0
on_signal() {
  local p sig=TERM
  stopping=$((stopping + 1))
  if ((stopping > 1)); then sig=KILL; fi   # asked twice: the members did not stop on SIGTERM
  log "received SIG$1: sending SIG$sig to ${#pids[@]} member(s)"
  for p in "${pids[@]}"; do kill -"$sig" "$p" 2>/dev/null || true; done
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

for ((i = 0; i < GROUP_SIZE; i++)); do
  if ((stopping > 0)); then break; fi   # told to stop while starting: start no more members
  rank=$((OFFSET + i))
  args=()
  for a in "$@"; do
    a=${a//\{rank\}/$rank}
    a=${a//\{local_rank\}/$i}
    a=${a//\{port\}/$port}
    args+=("$a")
  done
  logfile="$LOGDIR/p$rank.log"
  echo "=== $(date '+%Y-%m-%d %H:%M:%S') attempt ${SUPERVISE_ATTEMPT:-1}: ${args[*]}" >> "$logfile"
  if ((i == 0)); then
    GROUP_RANK=$rank GROUP_LOCAL_RANK=$i GROUP_SIZE=$GROUP_SIZE "${args[@]}" > >(tee -a "$logfile") 2>&1 &
  else
    GROUP_RANK=$rank GROUP_LOCAL_RANK=$i GROUP_SIZE=$GROUP_SIZE "${args[@]}" >> "$logfile" 2>&1 &
  fi
  pids+=($!)
done
n=${#pids[@]}
log "started $n process(es) (ranks $OFFSET..$((OFFSET + GROUP_SIZE - 1))${port:+, coordinator port $port}," \
    "logs $LOGDIR/p<rank>.log)"

# Poll the members: reap each one that ended; the first non-zero exit stops the rest (SIGTERM, then SIGKILL after
# GROUP_KILL_GRACE_S: a member blocked in a collective may not act on SIGTERM).
declare -A done_rc=()
status=0
failed=""
kill_at=""
while ((${#done_rc[@]} < n)); do
  for ((i = 0; i < n; i++)); do
    p=${pids[$i]}
    if [[ -n "${done_rc[$i]+x}" ]] || kill -0 "$p" 2>/dev/null; then continue; fi
    rc=0
    wait "$p" 2>/dev/null || rc=$?
    done_rc[$i]=$rc
    if ((rc != 0)) && [[ -z "$failed" ]]; then
      failed=$i
      status=$rc
      if ((stopping == 0)); then
        log "rank $((OFFSET + i)) (pid $p) exited with code $rc: stopping the other member(s)"
        for q in "${pids[@]}"; do kill -TERM "$q" 2>/dev/null || true; done
        kill_at=$((SECONDS + GRACE))
      fi
    fi
  done
  if [[ -n "$kill_at" ]] && ((SECONDS >= kill_at)); then
    for ((i = 0; i < n; i++)); do
      if [[ -z "${done_rc[$i]+x}" ]] && kill -KILL "${pids[$i]}" 2>/dev/null; then
        log "rank $((OFFSET + i)) (pid ${pids[$i]}) still running ${GRACE} s after SIGTERM: sent SIGKILL"
      fi
    done
    kill_at=""
  fi
  if ((${#done_rc[@]} < n)); then sleep 0.2; fi
done
wait 2>/dev/null || true   # the tee of member 0
if [[ -n "$failed" ]]; then
  codes=""
  for ((i = 0; i < n; i++)); do codes+="${done_rc[$i]} "; done
  log "group failed: rank $((OFFSET + failed)) exited with code $status first (exit codes by rank: ${codes% })"
fi
exit "$status"
