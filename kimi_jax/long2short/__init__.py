"""long2short (report §2.4): shorter responses from a long-CoT model.

  merge.py       weighted average of two checkpoints
  samples.py     n verified samples per prompt (the data of rs and dpo)
  rejection.py   shortest rejection sampling -> a prompt/response file for SFT
  dpo.py         pairs (shortest correct vs longer) and a sharded DPO step
  stages.py      resumable, timed stages
  comparison.py  every method from one long model, evaluated alike (launch.long2short)
  report.py      long2short.json and the accuracy-vs-tokens plot

long2short RL is the RL trainer with `config.init_from`, the length
penalty from iteration 0 and a shorter max length (configs/long2short_tiny.py).
Nothing in kimi_jax.rl imports this package.
"""
