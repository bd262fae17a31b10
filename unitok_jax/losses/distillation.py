"""TokenFlow's semantic distillation: the decoded semantic features against a frozen teacher's (cosine), and the
generator terms of the official parity fixture."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from unitok_jax.models import layers as L


def cosine_distillation_loss(sem_rec: jax.Array, teacher_feats: jax.Array) -> jax.Array:
    """mean over tokens of 1 - cos(sem_rec, teacher) with both sides l2-normalised (vq_loss.calculate_clip_rec_loss)."""
    a = L.l2_normalize(sem_rec, -1)
    b = L.l2_normalize(jax.lax.stop_gradient(teacher_feats), -1)
    return jnp.mean(1.0 - jnp.sum(a * b, axis=-1))


def tokenflow_loss_terms(
    images: jax.Array, pix_rec: jax.Array, aux: Mapping[str, jax.Array], teacher_feats: jax.Array
) -> dict[str, jax.Array]:
    """The non-perceptual, non-adversarial generator terms: rec_mse + vq + commit + entropy + sem_cos
    (the fixture's documented gradient loss; LPIPS and GAN terms are added by the trainer)."""
    rec = jnp.mean(jnp.square(pix_rec.astype(jnp.float32) - images.astype(jnp.float32)))
    sem = cosine_distillation_loss(aux["sem_rec"], teacher_feats)
    total = rec + aux["vq_loss"] + aux["commit_loss"] + aux["entropy_loss"] + sem
    return {
        "rec_mse": rec,
        "vq_loss": aux["vq_loss"],
        "commit_loss": aux["commit_loss"],
        "entropy_loss": aux["entropy_loss"],
        "sem_cos": sem,
        "total": total,
    }
