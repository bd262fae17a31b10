"""Every colab (colabs/*.ipynb) runs top to bottom on CPU, so they never rot: executed with nbclient in a fresh
kernel of this Python, against tiny checkpoints the notebooks write into a shared temporary directory."""

import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

COLABS = pathlib.Path(__file__).resolve().parents[1] / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))


def test_colabs_exist_and_have_no_outputs():
    assert [p.name for p in NOTEBOOKS] == [
        "01_tokenize_reconstruct.ipynb",
        "02_zero_shot_retrieval.ipynb",
        "03_compare_checkpoints.ipynb",
    ]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{path.name}: clear outputs before committing"
                )


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """The kernel inherits os.environ: one plain CPU device (not the 8 fake devices of conftest), a shared demo
    dir (the first notebook writes the tiny checkpoint, the others reuse it), and this interpreter's packages."""
    demo = tmp_path_factory.mktemp("colab_demo")
    saved = dict(os.environ)
    flags = " ".join(
        f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
    )
    os.environ.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=flags,
        UNITOK_DEMO_DIR=str(demo),
        MPLBACKEND="Agg",
        PYTHONPATH=os.pathsep.join([str(COLABS.parent)] + [p for p in sys.path if p]),
    )
    for key in ("UNITOK_DEMO_CHECKPOINT", "UNITOK_OFFICIAL_WEIGHTS", "UNITOK_CHECKPOINT_A", "UNITOK_CHECKPOINT_B"):
        os.environ.pop(key, None)
    yield demo
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_colab_runs_top_to_bottom(path, kernel_env):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", allow_errors=False, resources={"metadata": {"path": str(COLABS)}}
    )
    client.execute()
    if os.environ.get("UNITOK_COLAB_OUTPUT_DIR"):  # keep the executed notebook for inspection
        nbformat.write(nb, os.path.join(os.environ["UNITOK_COLAB_OUTPUT_DIR"], path.name))
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Traceback" not in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "the notebook should display images"
