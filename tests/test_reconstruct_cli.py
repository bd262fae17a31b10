"""`python -m unitok_jax.reconstruct` on an official-layout state dict (the parity fixture) and bad inputs."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_reconstruct_cli_writes_pairs_and_codes(tmp_path, fixtures_dir):
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(images / "b.jpg")  # grayscale
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "unitok_jax.reconstruct",
            f"--checkpoint={fixtures_dir / 'unitok_tiny.npz'}",
            f"--images={images}",
            f"--output={out}",
            "--image_size=64",
            "--model_preset=tiny",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reconstructed 2 images" in result.stdout
    # absl INFO lines (e.g. Orbax's per-restore logging) stay out of the console, as in the other CLIs.
    assert not [line for line in result.stderr.splitlines() if line[:1] == "I" and line[1:5].isdigit()]
    assert sorted(os.listdir(out)) == ["a_recon.png", "b_recon.png", "codes.npz"]
    assert Image.open(out / "a_recon.png").size == (128, 64)
    codes = np.load(out / "codes.npz")["codes"]
    assert codes.shape == (2, 4, 16) and codes.dtype == np.int32 and codes.max() < 64
