"""Issue 4 (reliability), faults other than kills (those are in test_reliability_resume.py):

- damaged checkpoints (unit level, `Checkpointer.restore_latest_good`): truncated / missing array files, missing
  commit marker, unreadable metadata, missing item, an interrupted save's tmp dir, shape mismatch, all damaged;
- all checkpoints damaged → the trainer fails loudly instead of silently starting from scratch;
- malformed records in an ArrayRecord dataset → `data/skipped` in metrics.jsonl of a real run, and I/O errors
  while writing metrics (metrics.jsonl replaced by a directory mid-run), images and TensorBoard do not stop it;
- `max_consecutive_nonfinite` non-finite steps in a row → the run stops naming the step, and the newest
  checkpoint is the last good state;
- a multi-host preemption sync point (`reached_preemption_sync_point`) → checkpoint at that step and exit 0;
- invalid configs fail before anything is compiled, naming the field.

The malformed-sample fuzz itself (>= 1000 samples through decode and the pipeline) is tests/test_data_fuzz.py.
"""

import gc
import io
import json
import os
import re
import shutil
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import reliability_config as rc
from train_helpers import micro_config
from unitok_jax.train import checkpointing, trainer


# Orbax leaves the read coroutines of a failed restore to the garbage collector ("Exception ignored in
# <coroutine _read_array_index_and_device_put>: GeneratorExit"); collect them here so they are not reported
# against whichever test happens to run next.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]  # trains or compiles train steps


@pytest.fixture(autouse=True)
def _collect_orbax_coroutines():
    yield
    gc.collect()


# ------------------------------------------------------------------------------------------------------------------
# Damaged checkpoints, unit level.


def _tree(seed: int):
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(size=(128, 64)).astype(np.float32),
        "b": rng.normal(size=(300,)).astype(np.float32),
        "step": np.int32(seed),
    }


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def _data_iter():
    return iter(grain.MapDataset.range(1000).to_iter_dataset())


def _write_checkpoints(directory, steps=(2, 4, 6)):
    ckpt = checkpointing.Checkpointer(directory, max_to_keep=5, async_save=True)
    it, position = _data_iter(), 0
    for step in steps:
        while position < step:  # the iterator position at step s is s
            position = next(it) + 1
        ckpt.save(step, jax.tree.map(jnp.asarray, _tree(step)), it, {"step": step})
    ckpt.close()


def _truncate(path, fraction=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * fraction))


def _array_files(step_dir):
    return [
        os.path.join(r, f)
        for r, _, fs in os.walk(os.path.join(step_dir, "state"))
        for f in fs
        if os.path.basename(r) == "d"
    ]


DAMAGE = {
    "truncated_array_file": lambda d: _truncate(max(_array_files(d), key=os.path.getsize)),
    "array_file_emptied": lambda d: _truncate(max(_array_files(d), key=os.path.getsize), 0.0),
    "array_file_deleted": lambda d: os.remove(max(_array_files(d), key=os.path.getsize)),
    "all_array_files_truncated": lambda d: [_truncate(p) for p in _array_files(d)],
    "no_commit_marker": lambda d: os.remove(os.path.join(d, "commit_success.txt")),
    "truncated_metadata": lambda d: _truncate(os.path.join(d, "state", "_METADATA")),
    "state_item_missing": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "data_item_missing": lambda d: shutil.rmtree(os.path.join(d, "data")),
    "empty_step_dir": lambda d: [shutil.rmtree(d), os.makedirs(d)],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, damage):
    directory = str(tmp_path / "checkpoints")
    _write_checkpoints(directory)
    DAMAGE[damage](os.path.join(directory, "6"))

    ckpt = checkpointing.Checkpointer(directory, async_save=False)
    seen = []
    it = _data_iter()
    step, state = ckpt.restore_latest_good(_abstract(_tree(4)), it, on_damaged=lambda s, e: seen.append(s))
    assert step == 4 and seen == [6]
    for key, want in _tree(4).items():
        np.testing.assert_array_equal(np.asarray(state[key]), want)
    assert next(it) == 4  # the data iterator is at step 4's position, not at the damaged step's
    # The damaged step was moved aside, so the resumed run can write step 6 again.
    assert ckpt.all_steps() == [2, 4] and os.listdir(directory + ".damaged") == ["6"]
    ckpt.save(6, jax.tree.map(jnp.asarray, _tree(6)), it, {"step": 6})
    ckpt.close()
    assert checkpointing.Checkpointer(directory, async_save=False).all_steps() == [2, 4, 6]


def test_interrupted_save_is_ignored_and_cleaned_up(tmp_path):
    """A kill during an async save leaves '<step>.orbax-checkpoint-tmp*': not a step, and deleted on open."""
    directory = str(tmp_path / "checkpoints")
    _write_checkpoints(directory, steps=(2, 4))
    partial = os.path.join(directory, "6.orbax-checkpoint-tmp-1234")
    shutil.copytree(os.path.join(directory, "4"), partial)
    os.remove(os.path.join(partial, "commit_success.txt"))
    ckpt = checkpointing.Checkpointer(directory, async_save=False)
    step, _ = ckpt.restore_latest_good(
        _abstract(_tree(4)), _data_iter(), on_damaged=lambda s, e: pytest.fail(f"{s}: {e}")
    )
    assert step == 4
    ckpt.save(6, jax.tree.map(jnp.asarray, _tree(6)))  # the tmp-dir cleanup is awaited before the next save
    ckpt.close()
    assert not os.path.exists(partial) and sorted(os.listdir(directory)) == ["2", "4", "6"]


def test_all_checkpoints_damaged_fails_loudly_and_moves_nothing(tmp_path):
    directory = str(tmp_path / "checkpoints")
    _write_checkpoints(directory, steps=(2, 4))
    DAMAGE["truncated_array_file"](os.path.join(directory, "4"))
    DAMAGE["no_commit_marker"](os.path.join(directory, "2"))
    ckpt = checkpointing.Checkpointer(directory, async_save=False)
    with pytest.raises(checkpointing.RestoreError, match=r"none of the 2 checkpoint\(s\).*step 4.*step 2.*move"):
        ckpt.restore_latest_good(_abstract(_tree(4)), _data_iter())
    ckpt.close()
    assert sorted(os.listdir(directory)) == ["2", "4"] and not os.path.exists(directory + ".damaged")


def test_only_uncommitted_saves_mean_start_from_scratch(tmp_path):
    """The first save was killed before its commit (e.g. on GCS, where the step dir is written in place): nothing
    was ever committed, so starting from scratch is right; the partial dir is moved out of the way."""
    directory = str(tmp_path / "checkpoints")
    _write_checkpoints(directory, steps=(2,))
    DAMAGE["no_commit_marker"](os.path.join(directory, "2"))
    ckpt = checkpointing.Checkpointer(directory, async_save=False)
    assert ckpt.restore_latest_good(_abstract(_tree(2)), _data_iter()) == (None, None)
    assert ckpt.all_steps() == [] and os.listdir(directory + ".damaged") == ["2"]
    ckpt.close()


def test_checkpoints_of_another_shape_fail_loudly(tmp_path):
    """A changed config (different shapes) must not look like 'no checkpoint' and restart from scratch."""
    directory = str(tmp_path / "checkpoints")
    _write_checkpoints(directory, steps=(2,))
    wrong = _abstract(_tree(2))
    wrong["w"] = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    with pytest.raises(checkpointing.RestoreError, match="none of the 1"):
        checkpointing.Checkpointer(directory, async_save=False).restore_latest_good(wrong, _data_iter())


def test_empty_directory_means_no_checkpoint(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    assert ckpt.restore_latest_good(_abstract(_tree(0)), _data_iter()) == (None, None)


def test_trainer_refuses_to_restart_from_scratch_over_damaged_checkpoints(tmp_path):
    config = micro_config(tmp_path, gan=False)
    workdir = tmp_path / "run"
    for step in (4, 8):  # step dirs that are not restorable checkpoints (one even claims to be committed)
        os.makedirs(workdir / "checkpoints" / str(step) / "state")
    (workdir / "checkpoints" / "8" / "commit_success.txt").write_text("Checkpoint commit was successful")
    with pytest.raises(checkpointing.RestoreError, match="Refusing to start from scratch"):
        trainer.train(config, str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]


# ------------------------------------------------------------------------------------------------------------------
# Config errors before compilation.


def _set(config, dotted, value):
    section, _, key = dotted.rpartition(".")
    node = config
    for part in section.split(".") if section else []:
        node = node[part]
    node[key] = value


CONFIG_ERRORS = [
    # (overrides, regex the message must match: it names the field)
    ({"model.quantizer.num_codebooks": 3}, r"quantizer\.num_codebooks\*codebook_dim=3\*4=12 != quant_proj\.out_dim=16"),
    (
        {"model.quant_proj.out_dim": 18, "model.post_quant_proj.in_dim": 18},
        r"num_codebooks\*codebook_dim.*quant_proj\.out_dim=18",
    ),
    ({"model.encoder.vit_heads": 3}, r"encoder\.vit_width=64 is not divisible by encoder\.vit_heads=3"),
    ({"model.decoder.vit_heads": 5}, r"decoder\.vit_width=64 is not divisible by decoder\.vit_heads=5"),
    ({"model.text.heads": 5}, r"text\.width=64 is not divisible by text\.heads=5"),
    ({"model.quant_proj.heads": 3}, r"quant_proj: .*not divisible by heads=3"),
    ({"model.post_quant_proj.heads": 3}, r"post_quant_proj: .*not divisible by heads=3"),
    ({"global_batch_size": 12}, r"config\.global_batch_size: .*data\*fsdp=8: 12 is not divisible by 8\. Fix:"),
    ({"mesh.data": 2, "mesh.fsdp": 4, "global_batch_size": 4}, r"config\.global_batch_size: .*data\*fsdp=8"),
    ({"data.image_size": 40}, r"config\.data\.image_size: .*16.*Fix:"),
    ({"model.image_size": 40}, r"image_size=40 must be divisible by 16"),
    ({"model_name": "vqgan"}, r"config\.model_name: unknown model 'vqgan'.*Fix: use one of"),
    ({"discriminator.name": "stylegan"}, r"config\.discriminator\.name: unknown discriminator 'stylegan'"),
    ({"data.name": "webdataset"}, r"config\.data\.name='webdataset': must be one of"),
    ({"data.tokenizer": "sentencepiece"}, r"config\.data\.tokenizer='sentencepiece'"),
    ({"loss.lpips": 1.0}, r"config\.loss\.lpips_path: .*no weight file is set\. Fix:"),
    ({"loss.lpips": 1.0, "loss.lpips_path": "/nonexistent/vgg.pth"}, r"config\.loss\.lpips_path: .*does not exist"),
    ({"discriminator.name": "dino"}, r"config\.discriminator\.dino_path: .*no weight file is set\. Fix:"),
    (
        {"discriminator.name": "dino", "discriminator.dino_path": "/nonexistent/dinov2.pth"},
        r"config\.discriminator\.dino_path: .*does not exist",
    ),
    ({"loss.gan_start": -1.0}, r"config\.loss\.gan_start: durations must be >= 0"),
]


@pytest.mark.parametrize("overrides,match", CONFIG_ERRORS, ids=[",".join(o) for o, _ in CONFIG_ERRORS])
def test_invalid_config_fails_before_compilation(tmp_path, monkeypatch, overrides, match):
    def compiled(*args, **kwargs):
        raise AssertionError("reached state init / compilation: the invalid config was not caught")

    monkeypatch.setattr(trainer, "_restore_or_init", compiled)
    monkeypatch.setattr(trainer, "jit_train_steps", compiled)
    config = micro_config(tmp_path, gan=True)
    for dotted, value in overrides.items():
        _set(config, dotted, value)
    with pytest.raises(ValueError, match=match):  # ConfigError and the model/data errors are ValueErrors
        trainer.train(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints") or not os.listdir(tmp_path / "run" / "checkpoints")


def test_unknown_config_field_on_the_command_line_is_rejected(tmp_path):
    """Typos such as --config.loss.lpis fail at flag parsing (the config is locked), with a suggestion."""
    run = rc.Run(
        ["--config=configs/unitok.py:tiny", f"--workdir={tmp_path / 'run'}", "--config.loss.lpis=1.0"],
        str(tmp_path / "cli"),
    )
    assert run.finish(timeout=300) != 0
    assert 'Did you mean "lpips"' in run.stderr(), run.describe()
    assert not os.path.exists(tmp_path / "run")


# ------------------------------------------------------------------------------------------------------------------
# Real runs (subprocesses on one CPU device sharing the compile cache with test_reliability_resume.py).


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("reliability_data")
    rc.build_data(path)
    return path


def _png(rng, size=40):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _dataset_with_bad_records(path, n=128, bad_every=4):
    """n records, every `bad_every`-th one malformed (three kinds: garbage record, truncated PNG, not an image)."""
    from unitok_jax.data import records

    rng = np.random.default_rng(0)
    payloads, bad = [], 0
    for i in range(n):
        rec = {"id": f"r{i}", "image": _png(rng), "caption": f"a random picture number {i}", "label": i % 10}
        if i % bad_every == bad_every - 1:
            bad += 1
            kind = (i // bad_every) % 3
            if kind == 0:
                payloads.append(rng.bytes(64))
                continue
            rec["image"] = rec["image"][:60] if kind == 1 else b"<svg></svg>"
        payloads.append(records.encode_record(rec))
    records.write_array_record(path, payloads)
    return bad


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_bad_records_are_counted_and_io_errors_do_not_stop_training(tmp_path, data_dir):
    """ArrayRecord data with 25 % malformed records; images/ and tensorboard/ are files (so every write fails);
    metrics.jsonl becomes a directory between ~step 4 and ~step 10. The run still finishes and checkpoints."""
    shards = tmp_path / "shards"
    shards.mkdir()
    num_bad = _dataset_with_bad_records(shards / "train.array_record")
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "images").write_text("not a directory")
    (workdir / "tensorboard").write_text("not a directory")
    metrics = workdir / "metrics.jsonl"
    args = rc.train_args(
        workdir,
        data_dir,
        "--config.data.name=array_record",
        f"--config.data.train_files={shards / 'train.array_record'}",
        f"--config.data.eval_files={shards / 'train.array_record'}",
    )
    run = rc.Run(args, str(tmp_path / "log"))

    assert run.wait_for(lambda: run.last_step() >= 4), run.describe()
    os.rename(metrics, tmp_path / "metrics_part1.jsonl")
    while True:  # the writer may recreate the file between the rename and the mkdir
        try:
            os.mkdir(metrics)
            break
        except FileExistsError:
            with open(tmp_path / "metrics_part1.jsonl", "a") as f:
                f.write(metrics.read_text())
            os.remove(metrics)
    blocked_from = run.last_step()
    assert run.wait_for(lambda: run.last_step() >= blocked_from + 4), run.describe()
    shutil.rmtree(metrics)
    unblocked_at = run.last_step()
    assert run.finish() == 0, run.describe()

    err = run.stderr()
    for what in ("metrics.jsonl", "images", "tensorboard"):
        assert re.search(rf"writing {what} failed \(\w+Error: .*training continues", err), (what, run.describe())
    assert err.count("writing metrics.jsonl failed") == 1  # reported once, retried silently
    assert rc.committed_steps(workdir)[-1] == rc.TOTAL_STEPS

    # Training records only (periodic evals append their own records to the same file).
    before, after = [
        [r for r in _jsonl(path) if "train/loss/total" in r] for path in (tmp_path / "metrics_part1.jsonl", metrics)
    ]
    assert before[0]["step"] == 1 and after[-1]["step"] == rc.TOTAL_STEPS
    lost = set(range(1, rc.TOTAL_STEPS + 1)) - {r["step"] for r in before + after}
    assert lost and min(lost) > blocked_from - 1 and max(lost) <= unblocked_at + 1, sorted(lost)
    skipped = [r["data/skipped"] for r in before + after]
    assert skipped == sorted(skipped) and skipped[-1] > 0
    # 16 steps x 8 rows = 128 good rows = one epoch's 96 good records + 32; about a quarter more were skipped.
    assert num_bad <= skipped[-1] <= num_bad + 16, (num_bad, skipped[-1])
    print(
        f"bad records: {num_bad} of 128; data/skipped at step {rc.TOTAL_STEPS}: {skipped[-1]}; "
        f"metrics lost while blocked: {sorted(lost)}"
    )


@pytest.mark.slow
def test_consecutive_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
    """Steps 1-5 are fine, every later batch is NaN; K = 3, checkpoints every 2 steps: steps 6-8 are dropped, the
    due checkpoints at 6 and 8 are not written, the run stops at step 8 naming it, and step 4 is the newest."""
    monkeypatch.setenv("RELIABILITY_POISON_AFTER", "5")
    workdir = tmp_path / "run"
    run = rc.Run(
        rc.train_args(workdir, data_dir, "--config.max_consecutive_nonfinite=3"),
        str(tmp_path / "log"),
        python_code=rc.DRIVER,
    )
    assert run.finish() not in (0, -signal.SIGKILL), run.describe()
    out = run.stdout() + run.stderr()
    assert "NonFiniteError" in run.stderr(), run.describe()
    assert "stopping: 3 consecutive steps up to step 8 had non-finite loss or gradients" in run.stdout(), run.describe()
    assert "max_consecutive_nonfinite=3" in out and "the last good checkpoint (step 4) is kept" in out
    assert "not checkpointing during a run of 1 non-finite step(s)" in run.stderr()
    assert rc.committed_steps(workdir) == [2, 4] and not rc.in_flight_saves(workdir)

    records = {r["step"]: r for r in _jsonl(workdir / "metrics.jsonl") if "train/loss/total" in r}
    assert [records[s]["train/nonfinite_steps"] for s in range(1, 9)] == [0, 0, 0, 0, 0, 1, 2, 3]
    assert [records[s]["train/step_was_finite"] for s in (5, 6, 7, 8)] == [1.0, 0.0, 0.0, 0.0]
    good = rc.saved_state(workdir, 4)
    assert all(np.isfinite(v).all() for v in good.values() if np.issubdtype(v.dtype, np.floating))
    assert int(good["['consecutive_nonfinite']"]) == 0 and int(good["['nonfinite_steps']"]) == 0


@pytest.mark.slow
def test_preemption_sync_point_checkpoints_and_exits_cleanly(tmp_path, data_dir, monkeypatch):
    """The multi-host path: `reached_preemption_sync_point(step)` turns true at step 5 (not a checkpoint step)."""
    monkeypatch.setenv("RELIABILITY_PREEMPT_AT", "5")
    workdir = tmp_path / "run"
    run = rc.Run(rc.train_args(workdir, data_dir), str(tmp_path / "log"), python_code=rc.DRIVER)
    assert run.finish() == 0, run.describe()
    assert "preempted at step 5: checkpoint written; exiting cleanly" in run.stdout(), run.describe()
    assert rc.committed_steps(workdir) == [2, 4, 5] and not rc.in_flight_saves(workdir)
    assert int(rc.saved_state(workdir, 5)["['step']"]) == 5
