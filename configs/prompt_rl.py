"""The shared shape of the real-model recipes: HF weights + prompt JSONL files.

Not an experiment itself (no get_config): configs/qwen2_5_math_1_5b.py and
configs/llama3_8b_pod.py call `base_config` with their model and sizes, so
the two recipes differ only where the models do.

Hyperparameters follow the method spec (../shared/k15_method.md); the report
discloses none of the RL values, so where the spec says "ours" so do we:
k = 8 samples per prompt, tau = 0.1, rollout temperature 1.0, top-p 1.0,
AdamW with clip 1.0 and the optimizer re-initialised every iteration, 1-4
minibatch steps per iteration, length penalty weight 0.2 switched on after
the first ~25% of iterations, repeat penalty 0.5, curriculum then hard
prompts only (report Fig. 9: the switch at ~60% of training).
"""
import ml_collections


def base_config(*, hf_path: str, train_file: str, heldout_file: str, add_bos: bool,
                total_iterations: int, prompts_per_iteration: int, max_length: int,
                max_prompt_length: int, segment_budget: int, minibatch_size: int,
                microbatch_size: int, learning_rate: float,
                mesh: dict, long_context: dict | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_iterations = total_iterations  # the report's scaling study: ~150 iterations
  c.eval_every = 10
  c.checkpoint_every = 5  # iterations are long: lose at most 5 of them
  c.keep_checkpoints = 3
  # Start from another run's checkpoint instead (an RL or SFT run directory,
  # RUN/checkpoints/<step>, an orbax or HF directory); "" = model.hf_path.
  c.init_from = ""

  # Architecture, vocabulary and weights come from the checkpoint's config.json
  # and safetensors; only the numerics are ours.
  c.model = ml_collections.ConfigDict(dict(
      hf_path=hf_path,
      param_dtype="float32",  # fp32 master weights for AdamW
      dtype="bfloat16",  # compute dtype; norms, softmax and logits stay fp32
      # README "Long context": kernels per backend, each block recomputed in
      # the backward pass, the LM head over 1024-token chunks, prefill in
      # 2048-token chunks; memory then grows linearly with the sequence.
      attention="auto", remat="full", scan_layers=True, logits_chunk=1024,
      # Scanned layers: XLA keeps remat's order in a scan's backward loop
      # (unrolled, the CPU compiler's schedule kept every block's activations);
      # rollouts run unrolled (the sampling layout's form, parallel.Layout).
      prefill_chunk=2048))
  if long_context:
    c.model.update(long_context)

  c.data = ml_collections.ConfigDict(dict(
      train_file=train_file,  # data/prompts.py JSONL; launch/curate.py writes difficulty
      heldout_file=heldout_file,
      # tokenizer.json of the checkpoint (a directory holding one works):
      # follows --config.model.hf_path unless overridden itself.
      tokenizer=c.model.get_ref("hf_path"),
      skip_invalid=False,  # a broken line stops the run, naming file:line:field
      add_bos=add_bos,
      verifier_workers=16,  # sandboxed code tests / math checks in parallel
      math_timeout_s=5.0, code_timeout_s=5.0))

  # The long-CoT warm-up is a separate stage: hf_path should point at the
  # warmed-up checkpoint (or the base model for RL from scratch).
  c.sft = ml_collections.ConfigDict(dict(steps=0))

  k = 8  # samples per prompt: the group whose mean reward is the baseline
  c.rollout = ml_collections.ConfigDict(dict(
      num_slots=prompts_per_iteration * k,
      samples_per_prompt=k,
      max_length=max_length,  # prompt + response, <= the model's positions
      max_prompt_length=max_prompt_length,
      segment_budget=segment_budget,  # partial rollouts: longer responses carry over
      partial=True,
      max_age=4,
      overlong_prompt="reject",  # counted in rollout/prompts_rejected_overlong
      temperature=1.0, top_k=0, top_p=1.0,
      # BPE tokens: a unit of up to 32 tokens repeated 4 times over >= 128 tokens.
      repeat_max_period=32, repeat_min_repeats=4, repeat_min_span=128))

  c.rl = ml_collections.ConfigDict(dict(
      loss="k15", tau=0.1, form="squared", normalisation="sequence",
      prompt_sampling="prioritized", prompt_eps=0.05,
      # Curriculum of the report (§2.3.4): all prompts, then only hard ones.
      # Needs a difficulty on every prompt; --config.rl.curriculum=none otherwise.
      curriculum="two_phase",
      hard_from_iteration=int(0.6 * total_iterations), hard_min_difficulty=0.5,
      task_reward="binary",  # binary: code passes ALL tests (report) | fraction: partial credit
      length_penalty_weight=0.2, length_penalty_start=total_iterations // 4,
      truncated_reward=0.0, repeat_penalty=0.5,
      minibatch_size=minibatch_size,
      # Finished samples of very different lengths share max_length rows, up to 8 a
      # row, instead of each being padded to max_length (rl/batch.py).
      samples_per_row=8,
      loss_segments="current_iteration"))  # only this iteration's tokens are on-policy

  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=learning_rate, warmup_iterations=0, b1=0.9, b2=0.95, weight_decay=0.0,
      clip_norm=1.0, microbatch_size=microbatch_size))

  # pass@1 at the rollout temperature, averaged over 4 samples (the report
  # averages 8 runs on AIME); greedy decoding is not reported.
  c.eval = ml_collections.ConfigDict(dict(temperature=1.0, samples=4, greedy=False,
                                          max_new_tokens=max_length - max_prompt_length))

  # Device mesh (kimi_jax/parallel.py), data x fsdp x tensor; -1 = the devices
  # left over. Training: weights over fsdp x tensor; sampling: over tensor.
  # data x fsdp must divide rollout.num_slots, rl.minibatch_size and
  # optim.microbatch_size, and be a multiple of the host count.
  c.mesh = ml_collections.ConfigDict(mesh)
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same recipe at toy sizes: 2 iterations of 2 prompts x 4 samples on a CPU
  (tests/test_recipes.py runs it on a tiny random checkpoint). A response is
  carried over once at most, so groups finish (and train) by iteration 2."""
  c.total_iterations = 2
  c.eval_every = c.checkpoint_every = 1
  c.rollout.update(num_slots=8, samples_per_prompt=4, max_length=64, max_prompt_length=32,
                   segment_budget=16, max_age=1, repeat_max_period=4, repeat_min_span=16)
  c.rl.update(minibatch_size=8, hard_from_iteration=1, length_penalty_start=1)
  c.optim.microbatch_size = 4
  c.data.verifier_workers = 2
  c.eval.update(samples=1, max_new_tokens=16)
  c.mesh.update(data=1, fsdp=1, tensor=1)  # one CPU device
  # The chunked paths, at toy sizes (more than one chunk per row).
  c.model.update(logits_chunk=16, prefill_chunk=16)
  return c
