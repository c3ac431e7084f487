"""Held-out evaluation (kimi_jax/rl/evaluation.py) counts correctness as the reward does."""
import collections

import jax
import numpy as np

from kimi_jax.models.transformer import ModelConfig, init_params
from kimi_jax.rl.evaluation import evaluate
from kimi_jax.tokenizers import BYTE_EOS_ID, byte_decode, byte_encode

CFG = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=1,
                  num_heads=2, num_kv_heads=1, max_position_embeddings=64)
Problem = collections.namedtuple("Problem", "prompt difficulty")


def test_partial_scores_are_not_correct():
  """A verifier score below full marks (e.g. a pass fraction of code tests)
  is a wrong answer for pass@1, as for the reward (`rewards.is_correct`)."""
  params = init_params(CFG, jax.random.PRNGKey(0))
  problems = [Problem("Q:1+1=", 1), Problem("Q:2+5=", 2), Problem("Q:9+9=", 2)]
  scores = {"Q:1+1=": 1.0, "Q:2+5=": 0.75, "Q:9+9=": 0.0}
  out = evaluate(CFG, params, problems, encode=byte_encode, decode=byte_decode,
                 score=lambda p, text: scores[p.prompt], max_new_tokens=4, eos_id=BYTE_EOS_ID)
  np.testing.assert_allclose(out["eval/accuracy"], 1 / 3)
  np.testing.assert_allclose(out["eval/accuracy_d1"], 1.0)
  np.testing.assert_allclose(out["eval/accuracy_d2"], 0.0)
  assert 1 <= out["eval/response_tokens_mean"] <= 4
