"""Launchers answer every mistake in one line with exit code 2, and keep a quiet console.

Each case runs a launcher as a user would (a subprocess) and checks: exit
code 2, exactly one line on stderr, starting "error: " and naming the key,
flag or path, and no traceback.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest

from configs import arith_tiny
from kimi_jax.rl import console, settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, cwd=REPO, env=None, timeout=300):
  full_env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
  full_env.pop("KIMI_JAX_VERBOSE", None)
  if env:
    full_env.update(env)
  return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True,
                        text=True, timeout=timeout)


def _one_line_error(proc, pattern):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]


def _config_file(tmp_path, edit):
  """A copy of arith_tiny's smoke config with one line of `edit` applied."""
  path = tmp_path / "cfg.py"
  path.write_text(textwrap.dedent(f"""\
      import ml_collections
      from configs import arith_tiny
      def get_config(arg=None):
        c = arith_tiny.get_config("smoke")
        with c.unlocked():
          {edit}
        return c
      """))
  return str(path)


TRAIN = ["-m", "launch.train", "--config=configs/arith_tiny.py:smoke"]


@pytest.mark.parametrize("extra,pattern", [
    # A misspelled override, at any depth, with the closest key.
    (["--config.rl.tua=0.1"], r"--config.rl.tua: config.rl has no key 'tua' "
                              r"\(did you mean --config.rl.tau\?\)"),
    (["--config.sedd=1"], r"config has no key 'sedd' \(did you mean --config.seed\?\)"),
    (["--config.rl.tau.x=1"], r"config.rl.tau is a float, not a section"),
    # Wrong types.
    (["--config.rl.tau=abc"], r"--config.rl.tau=abc: could not convert string to float"),
    (["--config.seed=1.5"], r"--config.seed=1.5: invalid literal for int"),
    # Out of range, or not one of the choices.
    (["--config.rl.tau=-1"], r"config.rl.tau must be a number > 0, got -1"),
    (["--config.rl.loss=reinforce"], r"config.rl.loss must be one of .*'reinforce'"),
    (["--config.eval.samples=0"], r"config.eval.samples must be >= 1, got 0"),
    # Flags themselves.
    (["--nosuchflag"], r"Unknown command line flag 'nosuchflag'"),
    (["--config=configs/no_such_config.py"], r"No such file or directory: "
                                             r"'configs/no_such_config.py'"),
    (["--config=configs/arith_tiny.py:smok"], r"unknown variant 'smok'"),
])
def test_train_mistakes_are_one_line(tmp_path, extra, pattern):
  _one_line_error(_run([*TRAIN, f"--workdir={tmp_path / 'run'}", *extra]), pattern)
  assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_train_missing_workdir_and_parent(tmp_path):
  _one_line_error(_run(TRAIN), r"--workdir is required")
  _one_line_error(_run([*TRAIN, f"--workdir={tmp_path / 'no' / 'such' / 'run'}"]),
                  r"parent directory .*no/such does not exist")


@pytest.mark.parametrize("edit,pattern", [
    ("c.rl.tua = 0.1", r"config.rl.tua: unknown key \(did you mean 'tau'\?\)"),
    ("c.rollout.temprature = 0.5", r"config.rollout.temprature: unknown key"),
    ("c.evall = {}", r"config.evall: unknown key \(did you mean 'eval'\?\)"),
    # ConfigDict itself refuses a value of another type than the one it holds...
    ("c.seed = 'zero'", r"Could not override field 'seed'.*zero"),
    # ...and a section written with wrong types is caught by the settings.
    ("c.seed = None", r"config.seed must be an int >= 0, got None"),
    ("c.rl = ml_collections.ConfigDict({**c.rl.to_dict(), 'tau': 'big'})",
     r"config.rl.tau must be a number, got 'big' \(str\)"),
    ("c.rollout = ml_collections.ConfigDict({**c.rollout.to_dict(), 'partial': 'yes'})",
     r"config.rollout.partial must be True or False, got 'yes'"),
    ("c.model = ml_collections.ConfigDict({**c.model.to_dict(), 'num_layers': 2.5})",
     r"config.model.num_layers must be an int, got 2.5"),
    ("c.data.tasks = ('add', 'chian')", r"unknown task 'chian' \(did you mean 'chain'\?\)"),
    ("del c['optim']", r"config.optim is missing"),
])
def test_config_file_mistakes_are_one_line(tmp_path, edit, pattern):
  config = _config_file(tmp_path, edit)
  _one_line_error(_run(["-m", "launch.train", f"--config={config}",
                        f"--workdir={tmp_path / 'run'}"]), pattern)


@pytest.mark.parametrize("path,value,pattern", [
    ("rl.prompt_sampling", "random", r"config.rl.prompt_sampling must be one of"),
    ("rl.success_ema_rate", 0.0, r"config.rl.success_ema_rate must be in \(0, 1\]"),
    ("rollout.repeat_min_repeats", 1, r"config.rollout.repeat_min_repeats must be >= 2"),
    ("optim.learning_rate", -1.0, r"config.optim.learning_rate must be > 0"),
    ("sft.long_frac", 1.5, r"config.sft.long_frac must be in \[0, 1\]"),
    ("data.n_train", 0, r"config.data.n_train must be >= 1"),
    ("mesh.tensor", 0, r"config.mesh.tensor must be a positive int or -1"),
])
def test_settings_name_the_config_key(path, value, pattern):
  """In-process: a value out of range names the key the user wrote (renamed
  fields included), not the library class's field."""
  config = arith_tiny.get_config()
  node, keys = config, path.split(".")
  for k in keys[:-1]:
    node = node[k]
  node[keys[-1]] = value
  with pytest.raises(settings.ConfigError, match=pattern):
    settings.from_config(config)


def test_unknown_keys_are_checked_even_where_a_section_is_unused():
  config = arith_tiny.get_config()
  config.sft.steps = 0  # no SFTConfig is built, the keys still are checked
  config.sft.lerning_rate = 1.0
  with pytest.raises(settings.ConfigError, match=r"config.sft.lerning_rate: unknown key "
                     r"\(did you mean 'learning_rate'\?\)"):
    settings.from_config(config)


def test_sweep_and_curate_and_convert_mistakes_are_one_line(tmp_path):
  _one_line_error(_run(["-m", "launch.sweep", "--sweep=configs/sweeps/arith_ablations.py",
                        f"--workdir={tmp_path}", "--config=configs/arith_tiny.py:smoke",
                        "--config.rl.tua=1", "--print_only"]),
                  r"did you mean --config.rl.tau\?")
  _one_line_error(_run(["-m", "launch.sweep", f"--workdir={tmp_path}"]), r"--sweep is required")
  _one_line_error(_run(["-m", "launch.curate", f"--prompts={tmp_path / 'none.jsonl'}",
                        f"--out={tmp_path / 'out'}", f"--model={tmp_path / 'model'}"]),
                  r"none.jsonl|model")
  _one_line_error(_run(["-m", "launch.curate", "--prompts=x", "--out=y", "--model=z",
                        "--samples=lots"]), r"--samples=lots")
  _one_line_error(_run(["-m", "launch.convert", f"--hf_dir={tmp_path / 'none'}",
                        f"--orbax_dir={tmp_path / 'out'}"]), r"none")
  _one_line_error(_run(["-m", "launch.convert", "--hf_dir=a", "--orbax_dir=b",
                        "--direction=sideways"]), r"--direction")


# ------------------------------------------------------------------ console


def test_console_line_says_no_finished_groups_instead_of_nan():
  row = {"train/loss": float("nan"), "rollout/groups_completed": 0.0,
         "rollout/groups_pending": 3.0, "time/rollout_s": 1.04, "time/update_s": 0.0}
  assert console.console_line(7, 160, row) == "iter 7/160 | no finished groups (3 pending) | 1.0 s"
  row = {"train/loss": 0.0123, "rollout/groups_completed": 12, "rollout/reward_mean": 0.42,
         "rollout/task_reward_mean": 0.5, "rollout/response_tokens_mean": 31.62,
         "time/rollout_s": 1.0, "time/reward_s": 0.1, "time/update_s": 1.0,
         "eval/accuracy": 0.47, "eval/greedy_accuracy": 0.52}
  assert console.console_line(20, 160, row) == (
      "iter 20/160 | reward 0.420 (correct 0.50) | loss 0.0123 | 31.6 tokens | 12 groups | "
      "2.1 s | eval pass@1 0.470, greedy 0.520")
  first = console.console_line(0, 160, {"train/loss": float("nan"), "eval/accuracy": 0.32})
  assert first == "iter 0/160 | before RL | eval pass@1 0.320" and "nan" not in first


def _script(tmp_path, body):
  """A launcher-like script in tmp_path/app, with a 'library' in tmp_path/lib."""
  (tmp_path / "lib").mkdir(exist_ok=True)
  (tmp_path / "lib" / "somelib.py").write_text(
      "import logging\ndef chatter():\n"
      "  logging.getLogger('somelib').info('library info')\n"
      "  logging.getLogger('somelib').warning('library warning')\n")
  (tmp_path / "app").mkdir(exist_ok=True)
  path = tmp_path / "app" / "tool.py"
  path.write_text("from kimi_jax import cli\n" + textwrap.dedent(body))
  return str(path)


def test_console_format_and_library_filter(tmp_path):
  script = _script(tmp_path, """\
      import sys
      from absl import logging
      sys.path.insert(0, %r)
      import somelib
      def main(argv):
        logging.info("our line")
        somelib.chatter()
      cli.run(main)
      """ % str(tmp_path / "lib"))
  proc = _run([script])
  assert proc.returncode == 0, proc.stderr
  lines = proc.stderr.splitlines()
  assert [re.sub(r"^\d\d:\d\d:\d\d ", "", l) for l in lines] == [
      "our line", "warning: library warning"], lines
  verbose = _run([script, "--verbose"])
  assert "library info" in verbose.stderr and "our line" in verbose.stderr


@pytest.mark.slow
def test_tensorflow_start_up_lines_are_quiet_unless_verbose(tmp_path):
  script = _script(tmp_path, """\
      def main(argv):
        import tensorflow  # what seqio and TFDS import
        print("imported", tensorflow.__name__)
      cli.run(main)
      """)
  proc = _run([script])
  assert proc.returncode == 0 and "imported tensorflow" in proc.stdout, proc.stderr
  assert proc.stderr.strip() == "", proc.stderr
  loud = _run([script], env={"KIMI_JAX_VERBOSE": "1"})
  assert "oneDNN" in loud.stderr or "cuda" in loud.stderr.lower(), loud.stderr
