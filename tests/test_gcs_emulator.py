"""The gs:// stack against a local GCS emulator (tests/gcs_emulator.py): epath/gcsfs, Orbax/TensorStore checkpoints,
Grain iterator state, TensorBoard events, child processes, and the emulator's own cleanup. No internet involved."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from gcs_emulator import gcs_emulator, gcs_tmp_path, running_gcs_emulator  # noqa: F401,F811  (fixtures)


def test_epath_file_operations(gcs_tmp_path):
    root = epath.Path(gcs_tmp_path)
    assert not root.exists()
    (root / "sub").mkdir(parents=True, exist_ok=True)
    (root / "sub" / "a.txt").write_text("hello")
    assert (root / "sub" / "a.txt").read_text() == "hello"
    payload = bytes(range(256)) * 1000
    with (root / "b.bin").open("wb") as f:
        f.write(payload)
    with (root / "b.bin").open("rb") as f:
        assert f.read() == payload
    assert (root / "b.bin").exists() and (root / "b.bin").is_file()
    assert (root / "sub").is_dir() and not (root / "missing").exists()
    assert sorted(p.name for p in root.iterdir()) == ["b.bin", "sub"]
    assert [os.fspath(p) for p in root.glob("*/*.txt")] == [f"{gcs_tmp_path}/sub/a.txt"]

    (root / "sub" / "a.txt").rename(root / "sub" / "c.txt")  # gcsfs: moveTo is refused, falls back to copy+delete
    assert [p.name for p in (root / "sub").iterdir()] == ["c.txt"]
    assert (root / "sub" / "c.txt").read_text() == "hello"
    (root / "b.bin").unlink()
    assert not (root / "b.bin").exists()
    root.rmtree()
    assert not root.exists()


def _tree(step: int):
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    sharded = jax.device_put(
        jnp.arange(64, dtype=jnp.float32).reshape(16, 4) * step,
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")),
    )
    return {"w": sharded, "b": {"x": jnp.full((3,), step, jnp.int32)}, "step": jnp.asarray(step)}


def test_orbax_checkpoint_manager_and_grain_state(gcs_tmp_path):
    import grain
    import orbax.checkpoint as ocp

    ckpt_dir = f"{gcs_tmp_path}/checkpoints"

    def manager():
        return ocp.CheckpointManager(
            ckpt_dir,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(enable_async_checkpointing=True, max_to_keep=2),
        )

    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    mgr = manager()
    for step in (1, 2, 3):
        for _ in range(step):
            next(it)
        mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_tree(step)),
                config=ocp.args.JsonSave({"step": step, "name": "run"}),
                data=grain.checkpoint.CheckpointSave(it),
            ),
        )
    mgr.wait_until_finished()
    assert mgr.all_steps() == [2, 3] and mgr.latest_step() == 3  # max_to_keep deleted step 1
    mgr.close()

    root = epath.Path(ckpt_dir)
    assert sorted(p.name for p in root.iterdir()) == ["2", "3"]
    for step in (2, 3):
        names = {p.name for p in (root / str(step)).iterdir()}
        assert {"commit_success.txt", "state", "config", "data"} <= names, names

    mgr = manager()  # a restarted run: fresh manager, nothing cached
    assert mgr.all_steps() == [2, 3]
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _tree(0))
    it2 = iter(grain.MapDataset.range(100).to_iter_dataset())
    restored = mgr.restore(
        mgr.latest_step(),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            config=ocp.args.JsonRestore(),
            data=grain.checkpoint.CheckpointRestore(it2),
        ),
    )
    mgr.close()
    expected = _tree(3)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored["state"], expected)
    assert restored["state"]["w"].sharding == expected["w"].sharding
    assert restored["config"] == {"step": 3, "name": "run"}
    assert next(it2) == 1 + 2 + 3  # the iterator resumes after the 6 elements consumed before step 3's save


def _read_scalars(data: bytes) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in a TFRecord-framed event file."""
    from tensorboardX.proto import event_pb2

    out, off = [], 0
    while off < len(data):
        (length,) = struct.unpack("<Q", data[off : off + 8])
        event = event_pb2.Event.FromString(data[off + 12 : off + 12 + length])
        off += 12 + length + 4
        out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    return out


def test_tensorboardx_writes_events_to_gs(gcs_tmp_path):
    # tensorboardX writes gs:// itself through google-cloud-storage (a gcsfs dependency), which honours
    # STORAGE_EMULATOR_HOST with anonymous credentials; each flush re-uploads the whole event file.
    from tensorboardX import SummaryWriter

    # Quirk: its GCSRecordWriter uploads again from __del__, i.e. at garbage collection, possibly at interpreter exit
    # when the emulator is gone (google-cloud-storage then retries for 120 s); disarm it once closed.
    writer = SummaryWriter(f"{gcs_tmp_path}/tb", flush_secs=3600)
    gcs_record_writer = writer.file_writer.event_writer._ev_writer._py_recordio_writer._writer
    for step in range(3):
        writer.add_scalar("loss", 1.0 / (step + 1), step)
    writer.flush()
    writer.add_scalar("loss", 0.125, 3)
    writer.close()
    gcs_record_writer.close = lambda: None
    files = list(epath.Path(f"{gcs_tmp_path}/tb").iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents.")
    scalars = _read_scalars(files[0].read_bytes())
    assert [(s, t) for s, t, _ in scalars] == [(i, "loss") for i in range(4)]
    np.testing.assert_allclose([v for *_, v in scalars], [1.0, 0.5, 1 / 3, 0.125], rtol=1e-6)


def test_child_process_uses_env(gcs_emulator, gcs_tmp_path):
    """`.env` alone lets another process (a trainer run, a multi-process worker) reach the same store."""
    script = textwrap.dedent(f"""
        import tensorstore as ts
        from etils import epath
        epath.Path({gcs_tmp_path!r}).joinpath("from_child.txt").write_text("child")
        kv = ts.KvStore.open({{"driver": "gcs", "bucket": {gcs_emulator.bucket!r},
                              "path": {gcs_tmp_path.split("/", 3)[3] + "/ts/"!r}}}).result()
        kv.write("key", b"tensorstore").result(timeout=30)
    """)
    env = {k: v for k, v in os.environ.items() if k not in gcs_emulator.env}  # only what .env provides
    env.update(gcs_emulator.env)
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    assert epath.Path(gcs_tmp_path, "from_child.txt").read_text() == "child"
    assert epath.Path(gcs_tmp_path, "ts", "key").read_bytes() == b"tensorstore"


def test_emulator_cleans_up_when_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with running_gcs_emulator("cleanup-bucket") as emu:
            pid, workdir, port = emu.pid, emu.workdir, int(emu.endpoint.rsplit(":", 1)[1])
            assert emu.endpoint.startswith("http://127.0.0.1:") and os.path.isdir(workdir)
            emu.create_bucket("second-bucket")  # idempotent helpers work while it runs
            emu.create_bucket("second-bucket")
            raise RuntimeError("boom")
    with pytest.raises(ProcessLookupError):  # reaped: the pid is gone
        os.kill(pid, 0)
    assert not os.path.exists(workdir)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
