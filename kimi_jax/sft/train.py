"""SFT training: response-only loss, optimizer, jitted step, the step loop.

Axis legend: N packed rows, T sequence length, V vocab; with images S image
slots per row, Y X C pixels.

The library entry point is `run_sft(cfg, params, examples, sft_cfg)`; the
examples are packed by `kimi_jax.sft.packing` (whose docstring gives the
loss alignment). A run can be continued from a saved step: pass its
`opt_state` and `start_step` (the data stream is replayed up to it, so the
continued run sees the batches an uninterrupted one would have).

Image + text (`ModelConfig.vision`, `SFTConfig.image_slots` S > 0): the
batch's pixels go through the model's image encoder inside the loss, so the
tower trains with the LM unless `SFTConfig.train_vision` is False (then it
gets no gradient and no update).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kimi_jax import progress as progress_lib
from kimi_jax.models import image_placeholders, logits, vision
from kimi_jax.models.transformer import ModelConfig, Transformer
from kimi_jax.sft.config import SFTConfig
from kimi_jax.sft.packing import Example, PackedBatch, batches, example_images, pack

LogFn = Callable[[int, dict], None]
SaveFn = Callable[[int, object, object, list], None]  # (step, params, opt_state, history)
VISION = vision.PARAMS_KEY


def _is_vision(path) -> bool:
  return bool(path) and getattr(path[0], "key", None) == VISION


def _vision_leaves(params):
  """A pytree like `params` of Python bools: True at the image encoder's leaves."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _is_vision(path), params)


def sft_loss(params, cfg: ModelConfig, batch: PackedBatch):
  """Mean next-token cross-entropy (fp32) over masked targets.

  A batch with pixels (`pack` with image_slots S > 0) feeds them to the
  model as `[N*S, Y, X, C]`, S per row, placeholders replaced only where
  `prompt_mask_NT` is True (None: everywhere); the model must have an image
  encoder (else ValueError at trace time). Text-only batches: the LM alone.

  Returns `(loss, metrics)`; metrics: loss, accuracy (greedy token accuracy
  on the masked targets), tokens (number of masked targets), fill (fraction
  of non-padding positions).
  """
  images = image_placeholders.slot_inputs(batch.pixels_NSYXC, batch.prompt_mask_NT)
  hidden_NTD = Transformer(cfg).apply(
      {"params": params}, batch.tokens_NT, positions_BT=batch.positions_NT,
      segment_ids_BT=batch.segment_ids_NT, return_hidden=True, **images)
  # Target of t is token t+1; the last column's target is a dummy 0 that the
  # mask always excludes (see kimi_jax/sft/packing.py).
  targets_NT = jnp.pad(batch.tokens_NT[:, 1:], ((0, 0), (0, 1)))
  logp_NT, hit_NT = logits.next_token_logprobs(cfg, params, hidden_NTD, targets_NT,
                                               with_argmax=True)
  mask_NT = batch.loss_mask_NT.astype(jnp.float32)
  tokens = jnp.sum(mask_NT)
  denom = jnp.maximum(tokens, 1.0)
  loss = -jnp.sum(logp_NT * mask_NT) / denom
  correct_NT = hit_NT.astype(jnp.float32)
  metrics = {"loss": loss, "accuracy": jnp.sum(correct_NT * mask_NT) / denom,
             "tokens": tokens,
             "fill": jnp.mean((batch.segment_ids_NT > 0).astype(jnp.float32))}
  return loss, metrics


def lr_schedule(sft_cfg: SFTConfig) -> optax.Schedule:
  """Linear warm-up (the first step already uses a nonzero rate), then cosine."""
  peak, warmup = sft_cfg.learning_rate, sft_cfg.warmup_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=peak / warmup if warmup else peak, peak_value=peak,
      warmup_steps=warmup, decay_steps=max(sft_cfg.steps, warmup + 1),
      end_value=peak * sft_cfg.end_lr_frac)


def make_optimizer(sft_cfg: SFTConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW on `lr_schedule` (no decay on vectors).

  With `train_vision=False` params["vision"] get a zero update and no
  optimizer state, and the clipping norm is the LM's alone (multi_transform
  hands each branch only its own leaves). The default keeps the plain chain,
  so text-only opt_states are laid out as before.
  """
  inner = optax.chain(
      optax.clip_by_global_norm(sft_cfg.clip_norm),
      optax.adamw(lr_schedule(sft_cfg), b1=sft_cfg.b1, b2=sft_cfg.b2,
                  weight_decay=sft_cfg.weight_decay,
                  mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
  if sft_cfg.train_vision:
    return inner
  return optax.multi_transform(
      {"train": inner, "frozen": optax.set_to_zero()},
      lambda p: jax.tree.map(lambda v: "frozen" if v else "train", _vision_leaves(p)))


def make_sft_step(cfg: ModelConfig, optimizer: optax.GradientTransformation,
                  train_vision: bool = True):
  """Jitted `step(params, opt_state, batch) -> (params, opt_state, metrics)`;
  params and opt_state are donated. metrics add grad_norm (before clipping).

  train_vision=False: params["vision"] come out as they went in (pair it
  with `make_optimizer` of the same setting)."""

  def step(params, opt_state, batch: PackedBatch):
    frozen = None if train_vision else _vision_leaves(params)

    def loss_fn(p):
      if frozen is not None:  # no backward pass through a frozen tower
        p = jax.tree.map(lambda x, f: jax.lax.stop_gradient(x) if f else x, p, frozen)
      return sft_loss(p, cfg, batch)

    grads, metrics = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    if frozen is not None:
      # Keep the frozen leaves themselves: even a zero update turns -0.0 into +0.0.
      new_params = jax.tree.map(lambda n, o, f: o if f else n, new_params, params, frozen)
    return new_params, opt_state, dict(metrics, grad_norm=optax.global_norm(grads))

  return jax.jit(step, donate_argnums=(0, 1))


def optimizer_and_step(cfg: ModelConfig, sft_cfg: SFTConfig):
  """(optimizer, jitted step) for these settings; runs that differ only in
  data order, logging or checkpointing share one compiled step."""
  return _optimizer_and_step(cfg, dataclasses.replace(sft_cfg, seed=0, log_every=1,
                                                      checkpoint_every=0))


@functools.lru_cache(maxsize=8)
def _optimizer_and_step(cfg: ModelConfig, sft_cfg: SFTConfig):
  optimizer = make_optimizer(sft_cfg)
  return optimizer, make_sft_step(cfg, optimizer, sft_cfg.train_vision)


def image_shape(cfg: ModelConfig) -> Optional[tuple[int, int, int]]:
  """`(Y, X, C)` of the pixels the model's image encoder takes (None: text only)."""
  v = cfg.vision
  return None if v is None else (v.image_size, v.image_size, v.num_channels)


def check_examples(cfg: ModelConfig, examples: Sequence[Example], sft_cfg: SFTConfig) -> None:
  """ValueError, naming the example, unless the examples' images suit the
  model: images (or image_slots > 0) need `cfg.vision`, pixels of the
  encoder's shape, and each prompt's placeholders (`cfg.image_token_id`)
  must be exactly `tokens_per_image` per image (a mismatch would silently
  leave placeholders as tokens or drop images inside the jitted loss)."""
  if sft_cfg.image_slots and cfg.vision is None:
    raise ValueError(f"SFTConfig.image_slots={sft_cfg.image_slots} but the model has no image "
                     "encoder (ModelConfig.vision is None)")
  shape = image_shape(cfg)
  per_image = None if cfg.vision is None else cfg.vision.tokens_per_image
  for i, example in enumerate(examples):
    images = example_images(example, f"example {i}")
    n = 0 if images is None else images.shape[0]
    if n and cfg.vision is None:
      raise ValueError(f"example {i} has {n} images but the model has no image encoder "
                       "(ModelConfig.vision is None)")
    if cfg.vision is None:
      continue
    if n and tuple(images.shape[1:]) != shape:
      raise ValueError(f"example {i}: images of shape {tuple(images.shape[1:])} but the image "
                       f"encoder takes {shape} (Y, X, C)")
    count = int(np.sum(np.asarray(example[0]) == cfg.image_token_id))
    if count != n * per_image:
      raise ValueError(f"example {i}: {count} image placeholder tokens (id "
                       f"{cfg.image_token_id}) in the prompt but {n} images x {per_image} = "
                       f"{n * per_image}")


def run_sft(cfg: ModelConfig, params, examples: Sequence[Example], sft_cfg: SFTConfig, *,
            eos_id: Optional[int] = None, pad_id: int = 0, log_fn: Optional[LogFn] = None,
            progress: bool = True, opt_state=None, start_step: int = 0,
            save_fn: Optional[SaveFn] = None):
  """SFT of `params` on packed `examples` for `sft_cfg.steps` steps.

  eos_id defaults to `cfg.eos_id`. Examples with images (`Example.images`)
  need an image + text `cfg` and `sft_cfg.image_slots` >= the most images
  of one example (`check_examples` says what does not fit). The caller's `params` stay valid (the
  loop donates a copy). Deterministic for a given `sft_cfg.seed` and params.
  To continue a run, pass the `params` and `opt_state` saved after step
  `start_step`. `save_fn(step, params, opt_state, history)` is called every
  `sft_cfg.checkpoint_every` steps and after the last one, with the history
  rows up to that step.
  Returns `(params, history)`: history has one dict per step taken with step
  (1-based), epoch, loss, accuracy, tokens, fill, grad_norm, learning_rate.
  """
  eos_id = cfg.eos_id if eos_id is None else eos_id
  if eos_id is None:
    raise ValueError("run_sft needs an eos_id (argument or ModelConfig.eos_id)")
  if not examples:
    raise ValueError("run_sft got no examples")
  if not 0 <= start_step <= sft_cfg.steps or (start_step and opt_state is None):
    raise ValueError(f"run_sft: start_step {start_step} needs 0 <= start_step <= "
                     f"{sft_cfg.steps} and, when > 0, the saved opt_state")
  check_examples(cfg, examples, sft_cfg)
  shape = image_shape(cfg) if sft_cfg.image_slots else None
  _, skipped = pack(examples, sft_cfg.seq_len, eos_id, pad_id, sft_cfg.image_slots, shape)
  if skipped == len(examples):
    raise ValueError(f"all {skipped} SFT examples are longer than seq_len={sft_cfg.seq_len}")
  if skipped:
    logging.warning("sft: skipping %d/%d examples longer than seq_len=%d",
                    skipped, len(examples), sft_cfg.seq_len)

  optimizer, step_fn = optimizer_and_step(cfg, sft_cfg)
  params = jax.tree.map(jnp.copy, params)
  opt_state = optimizer.init(params) if opt_state is None else jax.tree.map(jnp.copy, opt_state)
  schedule = lr_schedule(sft_cfg)
  lrs = np.asarray(jax.vmap(schedule)(jnp.arange(sft_cfg.steps)))
  # Replaying the host-side stream (packing only) puts a continued run on the
  # batches an uninterrupted run would have seen.
  stream = itertools.islice(batches(examples, sft_cfg, eos_id, pad_id, shape), start_step, None)
  history: list[dict] = []
  bar = progress_lib.bar(total=sft_cfg.steps, initial=start_step, desc="sft",
                         disable=not progress)

  def record(i, epoch, metrics):
    row = {"step": i + 1, "epoch": epoch, "learning_rate": float(lrs[i]),
           **{k: float(v) for k, v in jax.device_get(metrics).items()}}
    history.append(row)
    bar.update(1)
    bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}", refresh=False)
    if log_fn is not None and (row["step"] % sft_cfg.log_every == 0
                               or row["step"] == sft_cfg.steps):
      log_fn(row["step"], row)

  # Metrics are fetched one step late so the host packs the next batch while
  # the device computes.
  pending = None
  for i in range(start_step, sft_cfg.steps):
    epoch, batch = next(stream)
    params, opt_state, metrics = step_fn(params, opt_state, batch)
    if pending is not None:
      record(*pending)
    pending = (i, epoch, metrics)
    done = i + 1
    if save_fn is not None and (done == sft_cfg.steps or (
        sft_cfg.checkpoint_every and done % sft_cfg.checkpoint_every == 0)):
      record(*pending)  # the saved step's metrics row exists before its checkpoint
      pending = None
      save_fn(done, params, opt_state, history)
  if pending is not None:
    record(*pending)
  bar.close()
  return params, history
