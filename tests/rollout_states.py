"""RolloutState helpers shared by the rollout-segment tests (not a test module)."""
import numpy as np

from kimi_jax.sampling.finish import FinishReason
from kimi_jax.sampling.state import RolloutState

RUNNING, BUDGET = int(FinishReason.RUNNING), int(FinishReason.BUDGET)


def make_state(prompts, max_length=64):
  """A state whose first len(prompts) rows hold the prompts, all active."""
  st = RolloutState.empty(len(prompts), max_length)
  tokens, length = st.tokens_BL.copy(), st.length_B.copy()
  for b, p in enumerate(prompts):
    tokens[b, :len(p)] = p
    length[b] = len(p)
  return st.replace(tokens_BL=tokens, length_B=length, prompt_len_B=length.copy(),
                    active_B=np.ones(len(prompts), bool))


def resume(state):
  """What the scheduler does to a carried row: mark it running again."""
  return state.replace(finish_B=np.where(state.finish_B == BUDGET, RUNNING, state.finish_B)
                       .astype(np.int32))
