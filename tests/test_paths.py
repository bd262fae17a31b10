"""unitok_jax.paths — the one path layer (local and object-store paths) — and the rule that nothing else in the
package touches paths with os.path / open / glob (they mistake gs://bucket/run for a relative local path)."""

import ast
import os
import pathlib

import pytest

from unitok_jax import paths

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "unitok_jax"
# Path operations that break on gs:// paths (they treat 'gs://b/run' as a relative local path).
# `os.fspath` and `posixpath` (names inside tar archives) are fine.
FORBIDDEN_OS = {"makedirs", "listdir", "replace", "rename", "remove", "unlink", "walk", "scandir", "mkdir", "rmdir"}


def _path_operations(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
            yield node.lineno, "open(...)"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module, name = node.value.id, node.attr
            if module in ("glob", "shutil") or (module == "os" and (name == "path" or name in FORBIDDEN_OS)):
                yield node.lineno, f"{module}.{name}"


def test_no_path_operation_outside_the_path_layer():
    offenders = []
    for file in sorted(PACKAGE.rglob("*.py")):
        if file == PACKAGE / "paths.py":
            continue
        for line, what in _path_operations(ast.parse(file.read_text())):
            offenders.append(f"{file.relative_to(PACKAGE.parent)}:{line}: {what}")
    assert not offenders, "use unitok_jax.paths instead:\n" + "\n".join(offenders)


def test_resolve_keeps_urls_and_makes_local_paths_absolute():
    assert paths.resolve("gs://bucket/run/") == "gs://bucket/run"
    assert paths.join("gs://bucket/run", "checkpoints", "3") == "gs://bucket/run/checkpoints/3"
    assert paths.parent("gs://bucket/run/metrics.jsonl") == "gs://bucket/run"
    assert paths.is_url("gs://b/x") and not paths.is_url("runs/x")
    assert paths.resolve("runs/x") == os.path.join(os.getcwd(), "runs/x")
    assert paths.resolve("~/x") == os.path.join(os.path.expanduser("~"), "x")


def test_local_glob_atomic_write_append_and_listing(tmp_path):
    for name in ("b.array_record", "a.array_record", "c.txt"):
        paths.write_text_atomic(tmp_path / "d" / name, name)
    assert paths.glob(f"{tmp_path}/d/*.array_record") == [
        f"{tmp_path}/d/a.array_record",
        f"{tmp_path}/d/b.array_record",
    ]
    assert paths.listdir(tmp_path / "d") == ["a.array_record", "b.array_record", "c.txt"]
    assert paths.listdir(tmp_path / "missing") == []
    paths.append_text(tmp_path / "log.txt", "1\n")
    paths.append_text(tmp_path / "log.txt", "2\n")
    assert paths.read_text(tmp_path / "log.txt") == "1\n2\n"
    assert not [n for n in os.listdir(tmp_path / "d") if ".tmp" in n]  # atomic writes leave no temporaries


def test_require_local_names_the_remedy():
    with pytest.raises(ValueError, match="gcsfuse"):
        paths.require_local("gs://bucket/shards/x.array_record", "reading ArrayRecord shards")


def test_check_writable_fails_for_a_path_below_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="not writable"):
        paths.check_writable(tmp_path / "file" / "run")
    paths.check_writable(tmp_path / "new" / "run")  # created, probed, probe removed
    assert paths.listdir(tmp_path / "new" / "run") == []


def test_check_writable_reports_a_read_only_file_system(read_only_dir):
    with pytest.raises(OSError, match="Read-only file system"):
        paths.check_writable(read_only_dir / "run")


def test_storage_emulator_host_configures_tensorstore(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:4443")
    monkeypatch.delenv("TENSORSTORE_GCS_HTTP_URL", raising=False)
    for name in (
        "GOOGLE_AUTH_TOKEN_FOR_TESTING",
        "FSSPEC_GCS_TOKEN",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
        "NO_GCE_CHECK",
    ):
        monkeypatch.delenv(name, raising=False)
    paths.configure_storage_emulator()
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == "http://127.0.0.1:4443"
    assert os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] and os.environ["FSSPEC_GCS_TOKEN"] == "anon"
    assert os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
