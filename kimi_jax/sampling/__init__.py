"""Sampling: the jitted KV-cached decoder and the rollout engine."""
from kimi_jax.sampling.sampler import SamplingConfig, generate, sample_token  # noqa: F401
