"""Test setup: 8 fake CPU devices, set before JAX initialises, and absl flags marked parsed (Grain workers need it)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "").split()
if not any("xla_force_host_platform_device_count" in f for f in _flags):
    _flags.append("--xla_force_host_platform_device_count=8")
# The suite is compile-bound (tiny shapes, many distinct programs): skipping LLVM's expensive optimisations cuts
# XLA:CPU compile times by ~40 % (micro train step 22.6 s -> 14.6 s, state init 21 s -> 9 s) while the programs
# still compute the same IEEE results (fast-math stays off). Tests only; a user-set flag wins.
if not any("xla_backend_optimization_level" in f for f in _flags):
    _flags += ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
os.environ["XLA_FLAGS"] = " ".join(_flags)

# One persistent XLA compilation cache per test session (shared by the xdist workers, which inherit the
# environment): the end-to-end tests compile the same train steps again on every (re)start of a run, as a
# production restart would, and this turns those repeats into cache hits. Only compiles of >= 1 s are stored.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="unitok_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import pathlib  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only file system (a read-only bind mount): chmod does not stop root, who runs CI."""
    src, dst = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    dst.mkdir()
    try:
        subprocess.run(["mount", "--bind", str(src), str(dst)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot bind-mount here (needs root): {e}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(dst)], check=True, capture_output=True)
        yield dst
    finally:
        subprocess.run(["umount", str(dst)], check=False, capture_output=True)
