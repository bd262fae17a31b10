# Helpers sourced by the launchers in launch/ (not run on its own).
#
# LAUNCH_DIR / REPO_ROOT: this folder and the repository root (the launchers run `python -m unitok_jax.main` from
# the caller's working directory; relative --config paths are relative to it).

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")

# arg_value NAME ARGS...: the value of --NAME=V or --NAME V among ARGS (the last one wins); empty if absent.
arg_value() {
  local name=$1 value="" prev=""
  shift
  local a
  for a in "$@"; do
    if [[ "$prev" == "--$name" ]]; then value=$a; fi
    if [[ "$a" == "--$name="* ]]; then value=${a#--"$name"=}; fi
    prev=$a
  done
  printf '%s' "$value"
}

# default_python: the project venv's interpreter ($REPO_ROOT/.venv/bin/python), else python3 with a warning.
default_python() {
  if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
    printf '%s' "$REPO_ROOT/.venv/bin/python"
  else
    echo "warning: $REPO_ROOT/.venv/bin/python not found (see README: install); using python3" >&2
    printf '%s' python3
  fi
}

# setup_compilation_cache WORKDIR: export JAX_COMPILATION_CACHE_DIR, default WORKDIR/jax_cache (a gs:// workdir
# gives a gs:// cache, which JAX supports). Set JAX_COMPILATION_CACHE_DIR yourself to choose another place, or to
# the empty string to turn the persistent cache off. A restart then loads the compiled train steps instead of
# compiling them again (minutes on a pod for the paper config).
setup_compilation_cache() {
  local workdir=${1%/}
  if [[ -z "${JAX_COMPILATION_CACHE_DIR+x}" && -n "$workdir" ]]; then
    export JAX_COMPILATION_CACHE_DIR="$workdir/jax_cache"
  fi
  if [[ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]]; then
    unset JAX_COMPILATION_CACHE_DIR
  else
    export JAX_COMPILATION_CACHE_DIR
  fi
}

# lock_workdir WORKDIR: refuse to start a second launcher on the same local workdir (two runs writing one
# checkpoint directory corrupt each other's saves). Holds an exclusive flock on WORKDIR/.launcher.lock through
# file descriptor 9, which the supervisor and every training process inherit, so the lock lasts as long as any
# of them runs (also an orphan left by `kill -9` on the launcher). Skipped for gs:// and other URLs, and where
# flock(1) is missing.
lock_workdir() {
  local workdir=$1
  if [[ -z "$workdir" || "$workdir" =~ ^[a-zA-Z][a-zA-Z0-9+.-]*:// ]] || ! command -v flock >/dev/null; then
    return 0
  fi
  mkdir -p "$workdir"
  exec 9>>"$workdir/.launcher.lock"
  if ! flock -n 9; then
    echo "another launcher (or a process it started) is still using --workdir=$workdir" \
         "(lock $workdir/.launcher.lock); stop it first" >&2
    exit 73
  fi
}
