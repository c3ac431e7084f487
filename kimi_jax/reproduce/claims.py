"""The report's claims at toy scale, each a set of effects over seeds.

`evaluate(runs)` takes {arm: {seed: runs.Run}} and returns one `Result` per
claim: its effects (verdicts.Effect, one value per seed that has every arm
the claim needs) and the verdict. A claim whose arms have not all run yet is
`pending`. The claims and the effect each is judged on:

1 rl_gains (Fig. 5)       k15: accuracy and greedy accuracy at the end minus
                          before RL; mean response tokens likewise; the token
                          growth on the hardest level minus the easiest
2 negative_gradients      k15 minus rest: the learning-curve mean (sample
  (Fig. 10)               efficiency) and the final accuracy
3 sampling (Fig. 9)       curriculum minus uniform, and k15 (prioritized)
                          minus uniform: final accuracy
4 length_penalty          lp_off minus k15: tokens per correct answer (the
  (§2.3.3)                penalty cuts them); k15 minus lp_off accuracy within
                          3 points (at equal accuracy); k15 minus lp_no_warmup
                          final accuracy (the warm-up matters)
5 partial_rollouts        k15 minus sync accuracy at the samples both trained,
  (§2.6.2)                within 3 points; sync minus k15 rollout + update
                          seconds per sample trained (less wall time)
6 long2short (Fig. 7)     not run here: launch.long2short is its own command
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

from kimi_jax.reproduce import verdicts
from kimi_jax.reproduce.runs import ACCURACY, GREEDY, TOKENS, Run
from kimi_jax.reproduce.verdicts import Effect

Runs = Mapping[str, Mapping[int, Run]]


@dataclasses.dataclass(frozen=True)
class Claim:
  key: str
  title: str
  report: str  # where the report makes it
  arms: tuple[str, ...]
  effects: Callable[[Mapping[str, Sequence[Run]]], list[Effect]]


@dataclasses.dataclass(frozen=True)
class Result:
  claim: Claim
  seeds: tuple[int, ...]
  effects: tuple[Effect, ...]
  note: str = ""

  @property
  def verdict(self) -> str:
    return verdicts.overall(self.effects) if self.effects else verdicts.PENDING


def _diff(a: Sequence[Run], b: Sequence[Run], f: Callable[[Run], float]) -> tuple[float, ...]:
  return tuple(f(x) - f(y) for x, y in zip(a, b))


def _rl_gains(r):
  k = r["k15"]
  levels = k[0].levels()
  out = [
      Effect("held-out pass@1 (T=1) rises: end - before RL",
             tuple(x.final(ACCURACY) - x.first(ACCURACY) for x in k)),
      Effect("greedy accuracy rises: end - before RL",
             tuple(x.final(GREEDY) - x.first(GREEDY) for x in k)),
      Effect("responses lengthen: mean held-out tokens, end - before RL",
             tuple(x.final(TOKENS) - x.first(TOKENS) for x in k), unit="tokens", scale=1.0)]
  if len(levels) > 1:
    lo, hi = levels[0], levels[-1]
    grow = lambda x, d: (x.final(f"eval/response_tokens_d{d}")  # noqa: E731
                         - x.first(f"eval/response_tokens_d{d}"))
    out.append(Effect(f"responses lengthen more on the hardest level: token growth at level "
                      f"{hi} - at level {lo}", tuple(grow(x, hi) - grow(x, lo) for x in k),
                      unit="tokens", scale=1.0))
    out.append(Effect(f"the hardest level (level {hi}) gains accuracy: end - before RL",
                      tuple(x.final(f"eval/accuracy_d{hi}") - x.first(f"eval/accuracy_d{hi}")
                            for x in k)))
  return out


def _negative_gradients(r):
  return [Effect("k1.5 learns faster than ReST: learning-curve mean pass@1, k15 - rest",
                 _diff(r["k15"], r["rest"], lambda x: x.curve_mean(ACCURACY))),
          Effect("k1.5 ends higher than ReST: final pass@1, k15 - rest",
                 _diff(r["k15"], r["rest"], lambda x: x.final(ACCURACY)))]


def _sampling(r):
  return [Effect("curriculum (all, then hard) beats uniform: final pass@1, curriculum - uniform",
                 _diff(r["curriculum"], r["uniform"], lambda x: x.final(ACCURACY))),
          Effect("prioritized beats uniform: final pass@1, prioritized (k15) - uniform",
                 _diff(r["k15"], r["uniform"], lambda x: x.final(ACCURACY)))]


def _length_penalty(r):
  on, off, cold = r["k15"], r["lp_off"], r["lp_no_warmup"]
  tol = verdicts.ACCURACY_TOLERANCE
  return [Effect("the penalty cuts held-out tokens per correct answer: no penalty - penalty",
                 _diff(off, on, Run.tokens_per_correct), unit="tokens", scale=1.0),
          Effect("at equal accuracy: final pass@1, penalty - no penalty",
                 _diff(on, off, lambda x: x.final(ACCURACY)), kind="equal", tolerance=tol),
          Effect("the warm-up matters: final pass@1, with warm-up - penalty from iteration 0",
                 _diff(on, cold, lambda x: x.final(ACCURACY)))]


def _partial_rollouts(r):
  part, sync = r["k15"], r["sync"]
  tol = verdicts.ACCURACY_TOLERANCE

  def per_sample(p: Run, s: Run) -> float:
    n = min(p.samples[-1], s.samples[-1])  # the samples both arms trained
    return p.at_samples(ACCURACY, n) - s.at_samples(ACCURACY, n)

  def ms_per_sample(x: Run) -> float:
    return 1000 * x.seconds[-1] / max(x.samples[-1], 1.0)

  return [Effect("the same accuracy per sample trained: pass@1 at equal samples, partial - sync",
                 tuple(per_sample(p, s) for p, s in zip(part, sync)), kind="equal",
                 tolerance=tol),
          Effect("less wall time: rollout + update ms per sample trained, sync - partial",
                 _diff(sync, part, ms_per_sample), unit="ms", scale=1.0)]


CLAIMS = (
    Claim("rl_gains", "RL raises accuracy and lengthens responses, more on harder levels",
          "§3.3, Fig. 5", ("k15",), _rl_gains),
    Claim("negative_gradients", "The k1.5 surrogate (negative gradients too) beats ReST "
          "(positive-only) in sample efficiency", "§3.5, Fig. 10", ("k15", "rest"),
          _negative_gradients),
    Claim("sampling", "Curriculum (easy -> hard) beats uniform; prioritized beats uniform "
          "prompt sampling", "§2.3.4, §3.5, Fig. 9", ("k15", "uniform", "curriculum"),
          _sampling),
    Claim("length_penalty", "The length penalty cuts tokens per correct answer at equal "
          "accuracy; its warm-up matters", "§2.3.3", ("k15", "lp_off", "lp_no_warmup"),
          _length_penalty),
    Claim("partial_rollouts", "Partial rollouts learn the same per sample as synchronous ones, "
          "in less wall time", "§2.6.2", ("k15", "sync"), _partial_rollouts),
)
LONG2SHORT = Claim("long2short", "long2short methods: accuracy against tokens", "§2.4, Fig. 7",
                   (), lambda r: [])


def evaluate(runs: Runs) -> list[Result]:
  """One Result per claim (CLAIMS, then the pending long2short section)."""
  results = []
  for claim in CLAIMS:
    have = [set(runs.get(a, {})) for a in claim.arms]
    seeds = tuple(sorted(set.intersection(*have))) if have else ()
    if not seeds:
      missing = [a for a in claim.arms if not runs.get(a)]
      results.append(Result(claim, (), (), note=f"pending: no finished run of {missing}"))
      continue
    by_arm = {a: [runs[a][s] for s in seeds] for a in claim.arms}
    results.append(Result(claim, seeds, tuple(claim.effects(by_arm))))
  results.append(Result(LONG2SHORT, (), (), note=(
      "not run by this suite: the comparison is its own command (`python -m launch.long2short "
      "--config=configs/long2short_tiny.py`); one run is in docs/long2short/, three seeds in the "
      "README's long2short section.")))
  return results
