"""Verifiable rewards: `math` (math-verify equivalence), `code` (sandboxed
tests), `exact` (string match for synthetic tasks).

Import the one you need (`from kimi_jax.verifiers import code`); nothing is
imported here, so loading one verifier never pulls in another's
dependencies.
"""
