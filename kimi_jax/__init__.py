"""kimi_jax: the Kimi k1.5 RL recipe for LLM reasoning in JAX/Flax."""
