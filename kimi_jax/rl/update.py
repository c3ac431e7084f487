"""The RL training phase: reference log-probs, then pure jitted update steps.

Axis legend: N rows of a minibatch (static; one sample each, or several
packed, `rl.batch`), M microbatches, n rows per microbatch (N = M * n), T
row length.

One iteration of k1.5 (method spec §1): the policy at the start of the
iteration, pi_theta_i, is the reference. `ref_logprobs` scores every sample
under it once; `train_step` then takes one optimizer step on a minibatch,
accumulating gradients over microbatches. The optimizer state is re-created
at every iteration start (`init_opt_state`), as the report does, because each
iteration solves a new mirror-descent problem.

Token alignment: `logp_NT[:, t] = log pi(tokens[t] | tokens[<t])` for t >= 1
and 0 at t = 0, so a mask over response TOKENS selects their log-probs.

Sharding: given a `parallel.Layout` (the training layout), both jitted
functions take and return arrays in it (in/out shardings), microbatches stay
split over the data axes, and gradients stay laid out like the params.
Without one they run exactly as before (no mesh, no constraints).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from kimi_jax.models import image_placeholders, logits, vision
from kimi_jax.models.transformer import ModelConfig, Transformer
from kimi_jax.rl import losses
from kimi_jax.rl.batch import Batch

if TYPE_CHECKING:
  from kimi_jax.parallel import Layout

VISION = vision.PARAMS_KEY


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
  """Optimizer and batching of the RL update.

  learning_rate: peak AdamW learning rate; the per-iteration value comes from
    `learning_rate_at` (linear warm-up over `warmup_iterations`, then constant).
  microbatch_size: samples per forward/backward pass (memory bound); the
    minibatch size must be a multiple of it.
  train_vision: image + text models: False freezes the image encoder
    (params["vision"]: no gradient, returned unchanged), True trains it with
    the LM.
  vision_lr_scale: image + text models: the tower's learning rate is
    `learning_rate * vision_lr_scale` (the LM's stays `learning_rate`), e.g.
    < 1 to move a pre-trained tower less than the policy. 1.0 (the default)
    adds no transform, so optimizer states keep their layout.
  """
  learning_rate: float = 1e-4
  warmup_iterations: int = 0
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  microbatch_size: int = 16
  train_vision: bool = True
  vision_lr_scale: float = 1.0

  def __post_init__(self):
    if not self.vision_lr_scale > 0:
      raise ValueError(f"UpdateConfig.vision_lr_scale must be > 0, got {self.vision_lr_scale}")
    if not self.learning_rate > 0:
      raise ValueError(f"UpdateConfig.learning_rate must be > 0, got {self.learning_rate}")
    if self.microbatch_size < 1:
      raise ValueError(f"UpdateConfig.microbatch_size must be >= 1, got {self.microbatch_size}")
    if self.warmup_iterations < 0:
      raise ValueError(f"UpdateConfig.warmup_iterations must be >= 0, got {self.warmup_iterations}")
    if self.clip_norm <= 0:
      raise ValueError(f"UpdateConfig.clip_norm must be > 0, got {self.clip_norm}")

  def learning_rate_at(self, iteration: int) -> float:
    if self.warmup_iterations and iteration < self.warmup_iterations:
      return self.learning_rate * (iteration + 1) / self.warmup_iterations
    return self.learning_rate


def make_optimizer(cfg: UpdateConfig) -> optax.GradientTransformation:
  """AdamW after global-norm clipping; the learning rate is a hyperparameter
  set per iteration, and non-finite updates are skipped (and counted).
  With `vision_lr_scale` != 1 the tower's updates are scaled after AdamW
  (params without a tower are untouched)."""
  adamw = optax.inject_hyperparams(optax.adamw)(
      learning_rate=cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  parts = [optax.clip_by_global_norm(cfg.clip_norm), adamw]
  if cfg.vision_lr_scale != 1.0:
    parts.append(optax.masked(optax.scale(cfg.vision_lr_scale), _vision_mask))
  return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=1_000_000)


def _vision_mask(params):
  """True on the leaves of params[VISION] (if any), False elsewhere."""
  return {k: jax.tree.map(lambda _: k == VISION, v) for k, v in params.items()}


def set_learning_rate(opt_state, lr: float):
  """Return opt_state with the AdamW learning rate replaced (no recompile)."""
  inner = opt_state.inner_state
  adam_state = inner[1]
  hyper = dict(adam_state.hyperparams, learning_rate=jnp.asarray(lr, jnp.float32))
  return opt_state._replace(
      inner_state=(inner[0], adam_state._replace(hyperparams=hyper), *inner[2:]))


def token_logprobs(cfg: ModelConfig, params, tokens_NT: jax.Array, *,
                   positions_NT: Optional[jax.Array] = None,
                   segment_ids_NT: Optional[jax.Array] = None, **image_inputs) -> jax.Array:
  """float32 `[N, T]`: log-prob of each token given the ones before it (0 at t=0).

  positions_NT / segment_ids_NT: packed rows (`rl.batch`): RoPE positions
  within each sample and its segment id (0 = padding); attention stays
  within a segment. The first token of a segment gets the previous
  segment's score there: it is a prompt token, never in a loss mask.
  image_inputs: image + text rows, `Transformer.apply`'s image keywords
  (`image_placeholders.slot_inputs` of a Batch's fields; the tower runs in
  the same forward, so its gradient comes with the LM's).
  """
  hidden_NTD = Transformer(cfg).apply({"params": params}, tokens_NT, positions_BT=positions_NT,
                                      segment_ids_BT=segment_ids_NT, return_hidden=True,
                                      **image_inputs)
  # Score every position against the next token (the last one against a dummy
  # 0) and shift the small [N, T] result, rather than slicing the [N, T, V]
  # logits: the slice's gradient is a pad that XLA materialised over the whole
  # logits (~40 ms per 2048-token step, and a 2x slower LM-head backward matmul
  # on its padded operand). The head runs in `cfg.logits_chunk` chunks.
  next_NT = jnp.pad(tokens_NT[:, 1:], ((0, 0), (0, 1)))
  picked_NT = logits.next_token_logprobs(cfg, params, hidden_NTD, next_NT)
  return jnp.pad(picked_NT[:, :-1], ((0, 0), (1, 0)))


def _microbatches(x, n):
  """[N, ...] -> [N // n, n, ...]; each microbatch split over the data axes
  (when a layout is active) rather than microbatches over devices."""
  mbs = x.reshape((x.shape[0] // n, n) + x.shape[1:])
  return nn.with_logical_constraint(mbs, (None, "activation_batch") + (None,) * (x.ndim - 1))


def _activate(layout: Optional["Layout"]):
  return contextlib.nullcontext() if layout is None else layout.activate()


def _check_batch(layout: "Layout", N: int, n: int):
  """Before the jitted call: jit places a host batch by its in_shardings
  (and fails with a generic message) before anything is traced."""
  layout.check_batch(N, "minibatch")
  layout.check_batch(n, "microbatch")


def make_ref_logprobs(cfg: ModelConfig, microbatch_size: int, layout: Optional["Layout"] = None):
  """Jitted `(params, tokens_NT, positions_NT=None, segment_ids_NT=None,
  pixels_NIYXC=None, image_prompt_NT=None) -> logp_NT`, microbatched to
  bound memory (the image fields as in `rl.batch.Batch`).

  With segment ids (the rows of an `rl.batch.Batch`, packed or not) a
  microbatch without any sample token is skipped (log-probs 0), as in the
  train step. layout: optional training `parallel.Layout`; params and rows
  are then taken (and log-probs returned) in it.
  """

  def ref_logprobs(params, tokens_NT, positions_NT=None, segment_ids_NT=None,
                   pixels_NIYXC=None, image_prompt_NT=None):
    with _activate(layout):
      if segment_ids_NT is None:
        mb = _microbatches(tokens_NT, microbatch_size)
        out = jax.lax.map(lambda t: token_logprobs(cfg, params, t), mb)
      else:
        rows = jax.tree.map(lambda x: _microbatches(x, microbatch_size),
                            (tokens_NT, positions_NT, segment_ids_NT, pixels_NIYXC,
                             image_prompt_NT))

        def one(rows_nT):
          t, p, sid, px, prompt = rows_nT
          images = image_placeholders.slot_inputs(px, prompt)
          return jax.lax.cond(
              jnp.any(sid > 0),
              lambda: token_logprobs(cfg, params, t, positions_NT=p, segment_ids_NT=sid,
                                     **images),
              lambda: jnp.zeros(t.shape, jnp.float32))

        out = jax.lax.map(one, rows)
      return out.reshape(tokens_NT.shape)

  if layout is None:
    return jax.jit(ref_logprobs)
  batch = layout.batch()
  text = jax.jit(ref_logprobs, in_shardings=(layout.params(), batch, batch, batch),
                 out_shardings=batch)
  multimodal = jax.jit(ref_logprobs, in_shardings=(layout.params(),) + (batch,) * 5,
                       out_shardings=batch)

  def sharded_ref_logprobs(params, tokens_NT, positions_NT=None, segment_ids_NT=None,
                           pixels_NIYXC=None, image_prompt_NT=None):
    _check_batch(layout, tokens_NT.shape[0], microbatch_size)
    if pixels_NIYXC is None:
      return text(params, tokens_NT, positions_NT, segment_ids_NT)
    return multimodal(params, tokens_NT, positions_NT, segment_ids_NT, pixels_NIYXC,
                      image_prompt_NT)

  return sharded_ref_logprobs


@flax.struct.dataclass
class TrainState:
  params: Any
  opt_state: Any
  step: jax.Array  # int32 optimizer steps taken (all iterations)
  skipped: jax.Array  # int32 non-finite updates skipped (all iterations)


def train_state_shardings(layout: "Layout", optimizer: optax.GradientTransformation) -> TrainState:
  """A TrainState of shardings: params and optimizer moments in `layout`,
  counters replicated."""
  return TrainState(params=layout.params(), opt_state=layout.opt_state(optimizer),
                    step=layout.replicated, skipped=layout.replicated)


def make_train_step(cfg: ModelConfig, loss_cfg: losses.LossConfig, update_cfg: UpdateConfig,
                    optimizer: optax.GradientTransformation, layout: Optional["Layout"] = None):
  """Returns a jitted `train_step(state, batch, ref_is_current=False) -> (state, metrics)`.

  `ref_is_current=True` is for the first step of an iteration, when
  `state.params` ARE the reference policy: `batch.ref_logp_NT` is then
  ignored and taken from the step's own forward pass.

  The minibatch's rows (`rl.batch.Batch`: one sample each, or packed) are
  split into microbatches of `update_cfg.microbatch_size` rows; each
  microbatch's loss is a mean over its valid samples, and microbatch
  gradients are weighted by their share of the valid samples, so the
  accumulated gradient is that of the mean over the whole minibatch. A
  microbatch with no valid sample (weight 0: empty rows of a short last
  minibatch, the rows packing freed) is skipped, not computed. The state is
  donated.

  Metrics: the loss's diagnostics, grad norm, and `train/tokens_computed`
  (row tokens of the microbatches computed) and `train/tokens_in_samples`
  (the sample tokens among them) for the padding fraction.

  With a training `layout` the state must be in `train_state_shardings`
  (e.g. params from `parallel.init_params`, `optimizer.init` of them), the
  batch's rows are split over the data axes (the minibatch and microbatch
  sizes must divide over them), and metrics come back replicated.
  """
  n = update_cfg.microbatch_size
  if layout is None:
    keep_like_params = lambda tree: tree  # noqa: E731
  else:
    # Under FSDP the gradient accumulator must stay sharded like the params
    # (propagation alone may leave the scan carry replicated).
    keep_like_params = functools.partial(jax.lax.with_sharding_constraint,
                                         shardings=layout.params())

  def micro_loss(params, b: Batch, ref_is_current: bool):
    if not update_cfg.train_vision and VISION in params:
      params = {**params, VISION: jax.lax.stop_gradient(params[VISION])}
    images = image_placeholders.slot_inputs(b.pixels_NIYXC, b.image_prompt_NT)
    logp_NT = token_logprobs(cfg, params, b.tokens_NT, positions_NT=b.positions_NT,
                             segment_ids_NT=b.segment_ids_NT, **images)
    if ref_is_current:
      # The iteration's first step runs at theta_i itself: the reference
      # log-probs are this forward pass's, so no separate pass is needed.
      b = b.replace(ref_logp_NT=jax.lax.stop_gradient(logp_NT))
    return losses.policy_loss(loss_cfg, logp_NT, b, return_aux=True)

  def train_step(state: TrainState, batch: Batch, ref_is_current: bool = False):
    N = batch.tokens_NT.shape[0]
    if N % n:
      raise ValueError(f"minibatch of {N} rows is not a multiple of microbatch_size {n}")
    with _activate(layout):
      return _train_step(state, batch, ref_is_current)

  def _train_step(state: TrainState, batch: Batch, ref_is_current: bool):
    mbs = jax.tree.map(lambda x: _microbatches(x, n), batch)
    total = jnp.maximum(jnp.sum(losses.loss_weights(loss_cfg, batch)), 1.0)
    loss_fn = functools.partial(micro_loss, ref_is_current=ref_is_current)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, mb):
      grads, loss_sum, aux_sum, tokens = carry
      w = jnp.sum(losses.loss_weights(loss_cfg, mb)) / total

      def compute():
        (loss, aux), g = grad_fn(state.params, mb)
        return keep_like_params(g), loss, aux

      # lax.cond runs one branch: a microbatch of empty rows costs nothing.
      g, loss, aux = jax.lax.cond(w > 0, compute, lambda: (zeros, jnp.zeros(()), aux_zero))
      grads = jax.tree.map(lambda a, x: a + w * x, grads, g)
      aux_sum = jax.tree.map(lambda a, x: a + w * x, aux_sum, aux)
      ran = (w > 0).astype(jnp.float32)
      tokens = tokens + ran * jnp.stack([mb.segment_ids_NT.size,
                                         jnp.sum(mb.segment_ids_NT > 0)]).astype(jnp.float32)
      return (grads, loss_sum + w * loss, aux_sum, tokens), None

    zeros = keep_like_params(jax.tree.map(jnp.zeros_like, state.params))
    first = jax.tree.map(lambda x: x[0], mbs)
    aux_zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(loss_fn, state.params, first)[1])
    (grads, loss, aux, tokens), _ = jax.lax.scan(
        accumulate, (zeros, jnp.zeros(()), aux_zero, jnp.zeros(2)), mbs)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if not update_cfg.train_vision and VISION in params:
      # A zero gradient is not a zero update (AdamW's decay, -0.0): keep the tower.
      params = {**params, VISION: state.params[VISION]}
    finite = opt_state.last_finite
    metrics = {"train/loss": loss, "train/grad_norm": optax.global_norm(grads),
               "train/update_finite": finite.astype(jnp.float32),
               "train/tokens_computed": tokens[0], "train/tokens_in_samples": tokens[1]}
    metrics.update({f"train/{k}": v for k, v in aux.items()})
    new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1,
                           skipped=state.skipped + (~finite).astype(jnp.int32))
    return new_state, metrics

  if layout is None:
    return jax.jit(train_step, donate_argnums=(0,), static_argnames=("ref_is_current",))
  state_shardings = train_state_shardings(layout, optimizer)
  # Positional static flag: jit with in_shardings takes no keyword arguments.
  jitted = jax.jit(train_step, in_shardings=(state_shardings, layout.batch()),
                   out_shardings=(state_shardings, layout.replicated),
                   donate_argnums=(0,), static_argnums=(2,))

  def sharded_train_step(state: TrainState, batch: Batch, ref_is_current: bool = False):
    _check_batch(layout, batch.tokens_NT.shape[0], n)
    return jitted(state, batch, ref_is_current)

  # Compile-only memory checks lower it like the unsharded (jitted) step.
  sharded_train_step.lower = lambda state, batch, ref_is_current=False: jitted.lower(
      state, batch, ref_is_current)
  return sharded_train_step
