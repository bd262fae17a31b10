"""Shared test config: the tiny UniTok config shrunk further so a train step compiles in seconds."""

import sys
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from configs import unitok as unitok_configs  # noqa: E402


def micro_config(tmp_path, *, gan: bool = True, batch: int = 8, steps: int = 4):
    c = unitok_configs.get_config("tiny")
    c.total_steps = steps
    c.ckpt_every_steps = 2
    c.log_every_steps = 1
    c.image_every_steps = 2
    c.global_batch_size = batch
    c.async_checkpointing = False
    c.data.image_size = 32
    c.model.image_size = 32
    c.data.data_dir = str(tmp_path / "data")
    c.data.embedded.update(dict(num_train=64, num_eval=16, image_size=32))
    c.data.context_length = 16
    c.model.text.context_length = 16
    c.model.encoder.update(dict(stage_depths=(1, 1), vit_depth=1))
    c.model.decoder.update(dict(vit_depth=1, inv_mbconv_depths=(1, 1)))
    c.discriminator.width = 16
    c.discriminator.num_layers = 2
    c.loss.gan = 0.4 if gan else 0.0
    c.loss.gan_start = 0.0
    c.loss.gan_ramp = 2.0
    c.eval.every_steps = 0  # periodic evals have their own tests (tests/test_evaluate.py)
    c.eval.at_end = False
    return c
