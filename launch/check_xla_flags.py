"""Check that every flag in XLA_FLAGS and LIBTPU_INIT_ARGS is known to the installed jaxlib / libtpu.

An unknown name in either variable aborts every process at start-up (XLA: "Unknown flag in XLA_FLAGS", libtpu:
"Unknown command line flag"), i.e. on a pod every worker dies before step 0. Check a preset before launching:

    PRESET=gpu source launch/xla_flags.sh && .venv/bin/python launch/check_xla_flags.py
    PRESET=tpu source launch/xla_flags.sh && .venv/bin/python launch/check_xla_flags.py --tpu_topology=v5p:2x2x1

XLA_FLAGS is checked by compiling a tiny function on the CPU backend: XLA's flag registry is the same for every
backend, so GPU flag names are checked on a machine without a GPU. LIBTPU_INIT_ARGS needs libtpu (installed with
jax[tpu]) and is checked by compiling for a deviceless TPU topology (no TPU needed; run it before training starts,
not next to a running job on a TPU VM). Each check runs in a child process. Exit code 0: all known; 1: an unknown
flag (named on stderr); 2: could not check.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys

_XLA_PROBE = "import jax, jax.numpy as jnp; jax.jit(lambda x: x + 1)(jnp.ones(2)).block_until_ready()"
_TPU_PROBE = """
import sys, jax, jax.numpy as jnp
from jax.experimental import topologies
topology = topologies.get_topology_desc(sys.argv[1], "tpu")
device = topology.devices[0]
sharding = jax.sharding.SingleDeviceSharding(device)
jax.jit(lambda x: x + 1).lower(jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=sharding)).compile()
"""
_UNKNOWN = re.compile(r"Unknown (?:flag in XLA_FLAGS: |command line flag ')(\S+?)'?$", re.MULTILINE)


def _run(code: str, env: dict, *args: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def check_xla_flags(flags: str) -> tuple[bool, str]:
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    env.pop("LIBTPU_INIT_ARGS", None)
    rc, out = _run(_XLA_PROBE, env)
    unknown = _UNKNOWN.findall(out)
    if unknown:
        return False, f"XLA_FLAGS: unknown to this jaxlib: {' '.join(unknown)}"
    if rc != 0:
        return False, f"XLA_FLAGS: the probe failed (exit {rc}):\n{out[-2000:]}"
    return True, f"XLA_FLAGS: all {len(flags.split())} flag(s) known to this jaxlib"


def check_libtpu_args(args: str, topology: str) -> tuple[bool | None, str]:
    if importlib.util.find_spec("libtpu") is None:
        return None, "LIBTPU_INIT_ARGS: not checked (libtpu is not installed here; install jax[tpu] to check)"
    env = dict(os.environ, LIBTPU_INIT_ARGS=args, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    rc, out = _run(_TPU_PROBE, env, topology)
    unknown = _UNKNOWN.findall(out)
    if unknown:
        return False, f"LIBTPU_INIT_ARGS: unknown to this libtpu: {' '.join(unknown)}"
    if rc != 0:
        return None, f"LIBTPU_INIT_ARGS: could not compile for topology {topology} (exit {rc}):\n{out[-2000:]}"
    return True, f"LIBTPU_INIT_ARGS: all {len(args.split())} flag(s) known to this libtpu ({topology})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tpu_topology", default="v5p:2x2x1", help="deviceless topology for the libtpu check")
    ns = parser.parse_args(argv)
    results = []
    xla = os.environ.get("XLA_FLAGS", "").strip()
    if xla:
        results.append(check_xla_flags(xla))
    tpu = os.environ.get("LIBTPU_INIT_ARGS", "").strip()
    if tpu:
        results.append(check_libtpu_args(tpu, ns.tpu_topology))
    if not results:
        print("neither XLA_FLAGS nor LIBTPU_INIT_ARGS is set: nothing to check")
        return 0
    for ok, message in results:
        print(message, file=sys.stdout if ok else sys.stderr)
    if any(ok is False for ok, _ in results):
        return 1
    return 2 if any(ok is None for ok, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
