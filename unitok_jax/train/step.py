"""Pure train step: `train_step(state, frozen, batch) -> (state, metrics)`, no side effects.

One call updates the tokenizer (reconstruction + VQ + CLIP [+ adaptive GAN]) and, when the GAN is active, the
discriminator (hinge + bCR). Whether the GAN is active is a *static* switch: the trainer compiles two versions and
picks one per step on the host, so there is never a Python `if` on a traced value. Steps whose loss or gradients
are not finite are not applied; they only advance the step and the health counters.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from unitok_jax.losses import adversarial, contrastive, reconstruction
from unitok_jax.train import param_groups
from unitok_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class LossWeights:
    l1: float = 0.2
    l2: float = 1.0
    lpips: float = 0.0
    vq: float = 1.0
    clip: float = 1.0
    gan: float = 0.4
    adaptive_gan_weight: bool = True
    adaptive_clamp: tuple[float, float] = (0.015, 1e4)
    bcr: float = 4.0
    bcr_cutout: float = 0.2
    distill: float = 1.0  # TokenFlow: cosine distillation of the semantic decoder against the frozen teacher


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Everything static the step needs (graph definitions, optimizers, schedule constants)."""

    model_graphdef: Any
    tx: optax.GradientTransformation
    weights: LossWeights
    mesh: Mesh | None
    gan_start_step: int = 0
    gan_ramp_steps: int = 0
    logit_scale_max: float = 4.605170185988092
    disc_graphdef: Any = None
    disc_tx: optax.GradientTransformation | None = None
    lpips_graphdef: Any = None
    # {'params', 'disc_params', <frozen keys>} -> shardings the arrays are gathered to where they are used
    # (parallel.sharding.compute_shardings); None = use them as stored.
    compute_shardings: Any = None
    diffaug: Callable[..., jax.Array] | None = None
    model_takes_text: bool = True  # the model's `takes_text` (models/tokenizer.py), known before tracing
    teacher_graphdef: Any = None  # TokenFlow's frozen semantic teacher (state in frozen['teacher'])


def _select(pred: jax.Array, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def _clamp_logit_scale(params, max_value: float):
    """open_clip clamps logit_scale to [0, ln 100] after every optimizer step."""

    def clamp(path, leaf):
        return jnp.clip(leaf, 0.0, max_value) if param_groups.path_string(path) == "logit_scale" else leaf

    return jax.tree_util.tree_map_with_path(clamp, params)


def _lpips_value(ctx: StepContext, frozen, rec, images):
    from unitok_jax.models.lpips import lpips_loss

    lpips_model = nnx.merge(ctx.lpips_graphdef, frozen["lpips"])
    return lpips_loss(lpips_model, images, rec)


def _compute_view(ctx: StepContext, name: str, tree):
    """FSDP: arrays are stored sharded over 'fsdp' and gathered here, so activations stay batch-sharded."""
    sh = (ctx.compute_shardings or {}).get(name)
    return tree if sh is None or tree is None else jax.lax.with_sharding_constraint(tree, sh)


def _discriminate(ctx: StepContext, disc_params, frozen, images, key):
    disc = nnx.merge(
        ctx.disc_graphdef,
        _compute_view(ctx, "disc_params", disc_params),
        _compute_view(ctx, "disc_rest", frozen["disc_rest"]),
    )
    return disc(images, rngs_or_key=key)


def _augment(ctx: StepContext, images, key, **kwargs):
    return ctx.diffaug(images, key, **kwargs) if ctx.diffaug is not None else images


@dataclasses.dataclass(frozen=True)
class FullBatchTerms:
    """Terms of a micro-batch's loss that depend on the whole batch (train.full_batch_accum).

    clip_cotangents: (∂L/∂image_features, ∂L/∂text_features, ∂L/∂logit_scale) of the full-batch CLIP term for this
      micro-batch's rows; the micro-batch adds the linear surrogate Σ g·feature instead of its own CLIP loss, so
      its gradient is exactly its share of the full-batch CLIP gradient. None: no CLIP term.
    adaptive_weight: the GAN's adaptive weight from full-batch gradient norms (None: computed here).
    """

    clip_cotangents: tuple[jax.Array, jax.Array, jax.Array] | None = None
    adaptive_weight: jax.Array | None = None


def _training_model(params, frozen, ctx: StepContext):
    params = _compute_view(ctx, "params", params)
    frozen = {k: v if k == "disc_rest" else _compute_view(ctx, k, v) for k, v in frozen.items()}
    # copy=True: fresh Variables at this trace level (reusing the jit-level ones raises TraceContextError
    # inside value_and_grad when the model holds Rngs, i.e. drop_path_rate > 0).
    return nnx.merge(ctx.model_graphdef, params, frozen["model_rest"], copy=True), frozen


def model_forward(params, frozen, batch, keys, ctx: StepContext):
    """(model, images, frozen views, reconstruction fp32, aux) of one training forward."""
    images = batch["image"].astype(jnp.float32)
    model, frozen = _training_model(params, frozen, ctx)
    # Per-step randomness (drop-path, TokenFlow's scale drop) comes from an explicit Rngs for this step's key.
    rec, aux = model(
        images,
        batch.get("text") if ctx.model_takes_text else None,
        deterministic=False,
        rngs=nnx.Rngs(dropout=keys["model"]),
    )
    return model, images, frozen, rec.astype(jnp.float32), aux


def clip_forward(params, frozen, batch, keys, ctx: StepContext) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The CLIP pair of `model_forward` (same random draws) without decoding: UniTok's `clip_features`."""
    model, _ = _training_model(params, frozen, ctx)
    return model.clip_features(
        batch["image"].astype(jnp.float32), batch["text"], deterministic=False, rngs=nnx.Rngs(dropout=keys["model"])
    )


def reconstruction_nll(ctx: StepContext, frozen, images) -> Callable[[jax.Array], jax.Array]:
    """rec -> weighted L1 + L2 (+ LPIPS): the 'nll' side of the adaptive GAN weight."""
    w = ctx.weights

    def nll_fn(r):
        value = w.l1 * reconstruction.l1_loss(r, images) + w.l2 * reconstruction.l2_loss(r, images)
        if w.lpips:
            value = value + w.lpips * _lpips_value(ctx, frozen, r, images)
        return value

    return nll_fn


def generator_adversarial(ctx: StepContext, state: TrainState, frozen, keys) -> Callable[[jax.Array], jax.Array]:
    """rec -> the generator's adversarial loss against the current (frozen for this update) discriminator."""
    disc_params = jax.lax.stop_gradient(state.disc_params)

    def gan_fn(r):
        logits = _discriminate(ctx, disc_params, frozen, _augment(ctx, r, keys["aug_gen"]), keys["disc_gen"])
        return adversarial.generator_adversarial_loss(logits)

    return gan_fn


def adaptive_kernel_grads(model, aux, rec, nll_fn, gan_fn) -> tuple[jax.Array, jax.Array]:
    """(∇_W nll, ∇_W gan) at the last decoder conv W: vjp of that conv with ∂loss/∂rec (no full 2nd backward)."""
    conv = model.last_decoder_conv
    x_last = jax.lax.stop_gradient(aux["decoder_last_input"])
    kernel = jax.lax.stop_gradient(conv.kernel.value)
    grad_kernel = functools.partial(
        adversarial.conv_kernel_gradient,
        x_last,
        kernel,
        strides=conv.strides,
        padding=conv.padding,
        groups=conv.feature_group_count,
    )
    rec_sg = jax.lax.stop_gradient(rec)
    return grad_kernel(jax.grad(nll_fn)(rec_sg)), grad_kernel(jax.grad(gan_fn)(rec_sg))


def generator_loss(
    params,
    state: TrainState,
    frozen,
    batch,
    keys,
    ctx: StepContext,
    gan_active: bool,
    given: FullBatchTerms | None = None,
):
    """Total generator loss and its metrics. `keys`: dict of PRNG keys for this step.

    `given` (micro-batches of full-batch accumulation): whole-batch terms computed beforehand; the reported
    `train/loss/total` then leaves out the CLIP term, which the caller knows for the whole batch.
    """
    w = ctx.weights
    model, images, frozen, rec, aux = model_forward(params, frozen, batch, keys, ctx)
    nll_fn = reconstruction_nll(ctx, frozen, images)
    metrics = {
        "train/loss/l1": reconstruction.l1_loss(rec, images),
        "train/loss/l2": reconstruction.l2_loss(rec, images),
        "train/loss/vq": aux["vq_loss"],
        "train/codebook/usage": jnp.mean(aux["codebook_usage"]),
        "train/codebook/perplexity": jnp.mean(aux["codebook_perplexity"]),
    }
    nll = nll_fn(rec)
    if w.lpips:
        metrics["train/loss/lpips"] = _lpips_value(ctx, frozen, rec, images)
    total = nll + w.vq * aux["vq_loss"]
    for name, value in model.extra_losses(aux).items():  # e.g. TokenFlow's commitment term, weighted like VQ
        metrics[f"train/loss/{name}"] = value
        total = total + w.vq * value
    if ctx.teacher_graphdef is not None and w.distill:
        from unitok_jax.losses.distillation import cosine_distillation_loss

        teacher = nnx.merge(ctx.teacher_graphdef, frozen["teacher"])
        distill = cosine_distillation_loss(aux["sem_rec"], teacher(images))
        metrics["train/loss/distill"] = distill
        total = total + w.distill * distill
    surrogate = jnp.zeros((), jnp.float32)
    clip_pair = model.clip_pair(aux)
    if clip_pair is not None and w.clip:
        if given is not None and given.clip_cotangents is not None:
            # ⟨g, x⟩ has gradient g·∂x/∂θ: this micro-batch's exact share of the full-batch CLIP gradient.
            surrogate = sum(
                jnp.sum(jax.lax.stop_gradient(g) * x.astype(jnp.float32))
                for g, x in zip(given.clip_cotangents, clip_pair)
            )
        else:
            clip = contrastive.clip_loss(*clip_pair, ctx.mesh)
            metrics["train/loss/clip"] = clip
            metrics["train/logit_scale"] = aux["logit_scale"]
            total = total + w.clip * clip

    if gan_active:
        gan_fn = generator_adversarial(ctx, state, frozen, keys)
        g_adv = gan_fn(rec)
        if given is not None and given.adaptive_weight is not None:
            adaptive = given.adaptive_weight
        elif w.adaptive_gan_weight:
            adaptive = adversarial.adaptive_weight(
                *adaptive_kernel_grads(model, aux, rec, nll_fn, gan_fn), w.adaptive_clamp
            )
        else:
            adaptive = jnp.ones((), jnp.float32)
        ramp = adversarial.gan_ramp(state.step, ctx.gan_start_step, ctx.gan_ramp_steps)
        gan_weight = ramp * w.gan * adaptive
        total = total + gan_weight * g_adv
        metrics.update(
            {"train/loss/g_adv": g_adv, "train/gan/adaptive_weight": adaptive, "train/gan/weight": gan_weight}
        )

    metrics["train/loss/total"] = total
    return total + surrogate, (metrics, rec)


def discriminator_loss(disc_params, frozen, images, fake, keys, ctx: StepContext):
    """Hinge loss on DiffAug'd real/fake plus bCR against strongly augmented views."""
    real_aug = _augment(ctx, images, keys["aug_real"])
    fake_aug = _augment(ctx, fake, keys["aug_fake"])
    logits_real = _discriminate(ctx, disc_params, frozen, real_aug, keys["disc_real"])
    logits_fake = _discriminate(ctx, disc_params, frozen, fake_aug, keys["disc_fake"])
    loss = adversarial.hinge_discriminator_loss(logits_real, logits_fake)
    metrics = {
        "train/loss/d_hinge": loss,
        "train/disc/logits_real": jnp.mean(logits_real),
        "train/disc/logits_fake": jnp.mean(logits_fake),
    }
    if ctx.weights.bcr:
        strong = dict(cutout=ctx.weights.bcr_cutout)
        s_real = _discriminate(
            ctx, disc_params, frozen, _augment(ctx, images, keys["bcr_real"], **strong), keys["disc_real"]
        )
        s_fake = _discriminate(
            ctx, disc_params, frozen, _augment(ctx, fake, keys["bcr_fake"], **strong), keys["disc_fake"]
        )
        bcr = adversarial.consistency_loss(s_real, logits_real) + adversarial.consistency_loss(s_fake, logits_fake)
        metrics["train/loss/d_bcr"] = bcr
        loss = loss + ctx.weights.bcr * bcr
    metrics["train/loss/d"] = loss
    return loss, metrics


_KEY_NAMES = ("model", "aug_gen", "disc_gen", "aug_real", "aug_fake", "disc_real", "disc_fake", "bcr_real", "bcr_fake")


def step_keys(state: TrainState) -> dict[str, jax.Array]:
    return dict(zip(_KEY_NAMES, jax.random.split(state.step_key(), len(_KEY_NAMES))))


def train_step(state: TrainState, frozen, batch, *, ctx: StepContext, gan_active: bool):
    keys = step_keys(state)
    (loss, (metrics, rec)), grads = jax.value_and_grad(generator_loss, has_aux=True)(
        state.params, state, frozen, batch, keys, ctx, gan_active
    )
    return apply_gradients(
        state, frozen, batch, keys, ctx=ctx, gan_active=gan_active, loss=loss, grads=grads, metrics=metrics, rec=rec
    )


def apply_gradients(
    state: TrainState, frozen, batch, keys, *, ctx: StepContext, gan_active: bool, loss, grads, metrics, rec
):
    """Apply the generator gradients and, with the GAN on, one discriminator update against `rec`; a step whose
    loss or gradients are not finite changes nothing but the step and the health counters."""
    metrics = dict(metrics)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = ctx.tx.update(grads, state.opt_state, state.params)
    params = _clamp_logit_scale(optax.apply_updates(state.params, updates), ctx.logit_scale_max)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
    if gan_active:
        fake = jax.lax.stop_gradient(rec)
        (d_loss, d_metrics), d_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
            state.disc_params, frozen, batch["image"].astype(jnp.float32), fake, keys, ctx
        )
        d_updates, new_d_opt = ctx.disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
        new_d_params = optax.apply_updates(state.disc_params, d_updates)
        d_grad_norm = optax.global_norm(d_grads)
        finite = finite & jnp.isfinite(d_loss) & jnp.isfinite(d_grad_norm)
        disc_params = _select(finite, new_d_params, disc_params)
        disc_opt_state = _select(finite, new_d_opt, disc_opt_state)
        metrics.update(d_metrics)
        metrics["train/grad_norm/disc"] = d_grad_norm

    consecutive = jnp.where(finite, 0, state.consecutive_nonfinite + 1)
    new_state = state.replace(
        step=state.step + 1,
        params=_select(finite, params, state.params),
        opt_state=_select(finite, opt_state, state.opt_state),
        disc_params=disc_params,
        disc_opt_state=disc_opt_state,
        nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
        consecutive_nonfinite=consecutive,
    )
    metrics.update(
        {
            "train/grad_norm/generator": grad_norm,
            "train/nonfinite_steps": new_state.nonfinite_steps,
            "train/consecutive_nonfinite": new_state.consecutive_nonfinite,
            "train/step_was_finite": finite.astype(jnp.float32),
        }
    )
    return new_state, metrics
