"""launch.reproduce: the verdict rule, what a claim reads from a run, the
runner's resume and report (with a scripted trainer), and the smoke suite."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from kimi_jax.reproduce import claims, runner, suites, verdicts
from kimi_jax.reproduce.runs import Run, load
from kimi_jax.reproduce.verdicts import Effect
from kimi_jax.stages import Stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------ verdict rule

@pytest.mark.parametrize("per_seed,verdict", [
    ((0.05, 0.06, 0.07), verdicts.REPRODUCED),
    ((0.05, -0.01, 0.07), verdicts.INCONCLUSIVE),  # one seed disagrees
    ((0.01, 0.20, 0.001), verdicts.INCONCLUSIVE),  # positive, but mean <= 2 se
    ((0.0, 0.0, 0.0), verdicts.NOT_REPRODUCED),
    ((-0.05, 0.01, -0.02), verdicts.NOT_REPRODUCED),
    ((0.05,), verdicts.INCONCLUSIVE),  # one seed: no spread, no verdict
    ((0.05, math.nan, 0.07), verdicts.INCONCLUSIVE),
])
def test_greater_rule(per_seed, verdict):
  assert Effect("x", per_seed).verdict == verdict


@pytest.mark.parametrize("per_seed,verdict", [
    ((0.01, -0.01, 0.0), verdicts.REPRODUCED),
    ((0.10, 0.11, 0.09), verdicts.NOT_REPRODUCED),
    ((0.02, 0.04, 0.03), verdicts.INCONCLUSIVE),  # |m| = tol, se > 0
])
def test_equal_rule(per_seed, verdict):
  assert Effect("x", per_seed, kind="equal", tolerance=0.03).verdict == verdict


def test_overall_and_numbers():
  good, bad = Effect("a", (0.1, 0.1, 0.12)), Effect("b", (-0.1, -0.1, -0.1))
  unsure = Effect("c", (0.1, -0.05, 0.1))
  assert verdicts.overall([good, good]) == verdicts.REPRODUCED
  assert verdicts.overall([good, unsure]) == verdicts.INCONCLUSIVE
  assert verdicts.overall([good, unsure, bad]) == verdicts.NOT_REPRODUCED
  assert verdicts.overall([]) == verdicts.PENDING
  assert good.numbers().startswith("+10.7 +- 0.7 points (seeds: +10.0, +10.0, +12.0)")


# ------------------------------------------------------------ runs and claims

def _run(acc, tokens, samples=None, seconds=None, levels=None):
  acc, tokens = np.asarray(acc, float), np.asarray(tokens, float)
  n = len(acc)
  evals = {"eval/accuracy": acc, "eval/greedy_accuracy": acc + 0.1,
           "eval/response_tokens_mean": tokens}
  for d, (a, t) in (levels or {}).items():
    evals[f"eval/accuracy_d{d}"] = np.asarray(a, float)
    evals[f"eval/response_tokens_d{d}"] = np.asarray(t, float)
  samples = np.arange(n) * 100.0 if samples is None else np.asarray(samples, float)
  seconds = np.arange(n) * 10.0 if seconds is None else np.asarray(seconds, float)
  return Run("/none", np.arange(n) * 10, evals, samples, seconds)


def test_run_statistics():
  r = _run([0.2, 0.3, 0.4, 0.5, 0.6], [30, 30, 32, 34, 36])
  assert r.first("eval/accuracy") == 0.2
  assert r.final("eval/accuracy") == pytest.approx(0.5)  # last three
  assert r.curve_mean("eval/accuracy") == pytest.approx(0.45)  # after iteration 0
  assert r.tokens_per_correct() == pytest.approx(34 / 0.5)
  assert r.at_samples("eval/accuracy", 250) == pytest.approx(0.45)


def test_load_counts_samples_and_seconds(tmp_path):
  rows = [{"iteration": 0, "eval/accuracy": 0.2, "eval/response_tokens_mean": 30.0,
           "train/loss": float("nan")},
          {"iteration": 1, "rollout/groups_completed": 3, "time/rollout_s": 1.0,
           "time/reward_s": 0.5, "time/update_s": 2.0},
          {"iteration": 2, "rollout/groups_completed": 2, "time/rollout_s": 1.0,
           "time/update_s": 1.0, "eval/accuracy": 0.4, "eval/response_tokens_mean": 28.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  r = load(str(tmp_path), samples_per_prompt=8)
  np.testing.assert_array_equal(r.eval_iterations, [0, 2])
  np.testing.assert_array_equal(r.samples, [0, 40])
  np.testing.assert_allclose(r.seconds, [0, 5.5])
  assert load(str(tmp_path / "absent"), 8) is None


def _arms(seeds=(0, 1, 2)):
  """Scripted runs in which every claim holds by construction."""
  lv = lambda a1, a3, t1, t3: {1: (a1, t1), 3: (a3, t3)}  # noqa: E731
  out = {}
  for s in seeds:
    e = 0.01 * s
    out.setdefault("k15", {})[s] = _run(
        [0.2, 0.4 + e, 0.5, 0.5, 0.5], [30, 31, 33, 34, 35],
        levels=lv([.6] * 5, [.05, .1, .15, .2, .2], [14] * 5, [40, 44, 48, 50, 52]))
    out.setdefault("rest", {})[s] = _run([0.2, 0.25, 0.3, 0.3, 0.3], [30] * 5)
    out.setdefault("uniform", {})[s] = _run([0.2, 0.3, 0.4, 0.4, 0.4], [30] * 5)
    out.setdefault("curriculum", {})[s] = _run([0.2, 0.3, 0.45, 0.45, 0.45], [30] * 5)
    out.setdefault("lp_off", {})[s] = _run([0.2, 0.4, 0.5, 0.5, 0.51 - e], [50] * 5)
    out.setdefault("lp_no_warmup", {})[s] = _run([0.2, 0.3, 0.3, 0.3, 0.3], [20] * 5)
    out.setdefault("sync", {})[s] = _run([0.2, 0.4 + e, 0.5, 0.5, 0.5], [30] * 5,
                                         seconds=np.arange(5) * 30.0)
  return out


def test_claims_reproduce_on_scripted_runs():
  results = {r.claim.key: r for r in claims.evaluate(_arms())}
  for key in ("rl_gains", "negative_gradients", "sampling", "length_penalty",
              "partial_rollouts"):
    assert results[key].verdict == verdicts.REPRODUCED, (key, [
        (e.claim, e.per_seed, e.verdict) for e in results[key].effects])
  assert results["long2short"].verdict == verdicts.PENDING
  gain = results["rl_gains"].effects[0]
  np.testing.assert_allclose(gain.per_seed, [0.3, 0.3, 0.3])
  wall = results["partial_rollouts"].effects[1]  # ms per sample trained, sync - partial
  np.testing.assert_allclose(wall.per_seed, [200.0] * 3)


def test_claims_pending_and_not_reproduced():
  arms = _arms()
  arms["rest"] = {s: arms["k15"][s] for s in (0, 1, 2)}  # ReST as good as k1.5
  del arms["sync"]
  results = {r.claim.key: r for r in claims.evaluate(arms)}
  assert results["negative_gradients"].verdict == verdicts.NOT_REPRODUCED
  assert results["partial_rollouts"].verdict == verdicts.PENDING
  assert "sync" in results["partial_rollouts"].note
  # Seeds that lack an arm are left out of that claim only.
  arms = _arms()
  del arms["uniform"][2]
  results = {r.claim.key: r for r in claims.evaluate(arms)}
  assert results["sampling"].seeds == (0, 1) and results["rl_gains"].seeds == (0, 1, 2)


# ------------------------------------------------------------ runner

def _fake_trainer(calls):
  """A train(config, workdir) that writes a metrics.jsonl shaped by the arm."""
  def train(config, workdir):
    calls.append(workdir)
    os.makedirs(workdir, exist_ok=True)
    boost = {"rest": -0.1, "uniform": -0.05}.get(os.path.basename(os.path.dirname(workdir)), 0)
    rows = [{"iteration": it, "rollout/groups_completed": 4, "time/rollout_s": 1.0,
             "eval/accuracy": 0.2 + (0.3 + boost) * it / max(config.total_iterations, 1)
             + 0.001 * config.seed, "eval/greedy_accuracy": 0.5,
             "eval/response_tokens_mean": 30.0 + it}
            for it in range(config.total_iterations + 1)]
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows
  return train


def test_runner_resumes_and_reports(tmp_path):
  suite = suites.get("smoke")
  calls = []
  path = runner.run(suite, str(tmp_path), train=_fake_trainer(calls))
  n_runs = len(suite.seeds) * (1 + len(suite.arms))
  assert len(calls) == n_runs
  assert calls[0].endswith("sft/seed0") and calls[1].endswith("k15/seed0")
  text = open(path).read()
  for claim in claims.CLAIMS:
    assert claim.title in text
  assert "--config.init_from=" in text and "launch.reproduce --suite=smoke" in text
  data = json.loads((tmp_path / "report.json").read_text())
  assert data["claims"]["negative_gradients"]["effects"][0]["per_seed"][0] > 0
  assert (tmp_path / "figures" / "rl_gains.png").stat().st_size > 0
  # A rerun does no work; a removed stage reruns alone.
  runner.run(suite, str(tmp_path), train=_fake_trainer(calls))
  assert len(calls) == n_runs
  stages = json.loads((tmp_path / "stages.json").read_text())
  del stages["rest/seed1"]
  (tmp_path / "stages.json").write_text(json.dumps(stages))
  runner.run(suite, str(tmp_path), train=_fake_trainer(calls))
  assert calls[n_runs:] == [str(tmp_path / "rest" / "seed1")]


def test_every_arm_config_builds():
  from kimi_jax.rl import settings
  for name, suite in suites.SUITES.items():
    for arm in suite.arms:
      config = runner.run_config(suite, suite.arm_overrides(arm, 0))
      settings.from_config(config)  # raises on a broken override
  with pytest.raises(ValueError, match="unknown"):
    suites.get("nope")


def test_report_only_on_missing_workdir(tmp_path):
  out = subprocess.run([sys.executable, "-m", "launch.reproduce", "--suite=smoke",
                        f"--workdir={tmp_path / 'absent'}", "--report_only"],
                       cwd=ROOT, capture_output=True, text=True)
  assert out.returncode != 0 and "does not exist" in out.stderr


@pytest.mark.slow
def test_smoke_suite_end_to_end(tmp_path):
  """The real trainer: every arm of both seeds, the report, and a rerun that
  does nothing."""
  cmd = [sys.executable, "-m", "launch.reproduce", "--suite=smoke", f"--workdir={tmp_path}"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  stages = json.loads((tmp_path / "stages.json").read_text())
  suite = suites.get("smoke")
  assert len(stages) == len(suite.seeds) * (1 + len(suite.arms))
  report = (tmp_path / "REPORT.md").read_text()
  assert report.count("**Verdict:") == len(claims.CLAIMS) + 1
  assert sorted(os.listdir(tmp_path / "figures")) == sorted(
      f"{k}.png" for k in ("rl_gains", "negative_gradients", "sampling", "length_penalty",
                           "partial_rollouts"))
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  assert again.returncode == 0
  assert json.loads((tmp_path / "stages.json").read_text()) == stages
