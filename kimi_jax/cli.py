"""What every launcher shares: a quiet console, and one-line errors.

  # launch/<name>.py
  from kimi_jax import cli   # first: it quiets TensorFlow / XLA before they load
  ...
  if __name__ == "__main__":
    cli.run(main)            # instead of absl.app.run(main)

Console: no TensorFlow / XLA / CUDA / libtpu / oneDNN start-up chatter and no
INFO logs of libraries; our log lines read "HH:MM:SS message" (warnings and
errors say so) and go through tqdm, so they never cut a progress bar; bars
are drawn only on a terminal. `--verbose` or KIMI_JAX_VERBOSE=1 brings the
full absl format and everything else back.

Errors a user can fix, one line "error: ..." on stderr, no traceback:
  * exit 2, bad input: a malformed or unknown flag, a misspelled
    `--config.KEY=VALUE` override (the closest key suggested), a value of
    the wrong type, a ConfigError (kimi_jax/rl/settings.py), a file or
    directory that does not exist, a broken prompt file or checkpoint;
  * exit 1, the machine: another OSError that names its path (disk full,
    read-only, permission denied).
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import difflib
import errno
import logging
import os
import re
import sys
import time
from typing import Callable, Optional

_VERBOSE = os.environ.get("KIMI_JAX_VERBOSE", "") not in ("", "0") or "--verbose" in sys.argv

if not _VERBOSE:
  # Read by TensorFlow's and XLA's C++ logging when they load: this module
  # is imported by the launchers before anything that imports them.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

# pylint: disable=wrong-import-position
from absl import app, flags
from tqdm import tqdm

flags.DEFINE_bool("verbose", False, "Full logs: absl format, library INFO logs, TensorFlow / "
                  "XLA start-up messages (also KIMI_JAX_VERBOSE=1).")

# Raised for bad input by our own modules; checked by class, looked up only
# if the module was imported (so this file imports none of them).
_INPUT_ERRORS = (("kimi_jax.rl.settings", "ConfigError"),
                 ("kimi_jax.data.prompts", "PromptFileError"),
                 ("kimi_jax.models.hf", "HFCheckpointError"),
                 ("kimi_jax.checkpointing", "CheckpointMismatchError"),
                 ("kimi_jax.data.curation_model", "CurationError"),
                 ("kimi_jax.verifiers.testgen_io", "TestGenInputError"))
_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)
_LIBRARY_LINE = 200  # characters of a library's warning or error shown
# TensorFlow's pre-absl::InitializeLog() lines ignore TF_CPP_MIN_LOG_LEVEL;
# they are written by C++ straight to fd 2 while `import tensorflow` runs.
_TF_NOISE = ("All log messages before absl::InitializeLog()", "port.cc:", "cudart_stub.cc:",
             "cuda_platform.cc:", "cpu_feature_guard.cc:", "To enable the following instructions",
             "cuda_dnn.cc:", "cuda_fft.cc:", "cuda_blas.cc:", "computation_placer.cc:",
             "Unable to register cu")


def fail(message: str, code: int = 2) -> None:
  """One line on stderr, then exit; never returns."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


# ------------------------------------------------------------------ console


class _Formatter(logging.Formatter):
  """HH:MM:SS message. A library's warning or error (INFO ones are filtered
  out) is cut to its first line: its traceback says what we report anyway
  in our own words, and --verbose shows it whole."""

  def __init__(self, roots):
    super().__init__()
    self._roots = tuple(roots)

  def format(self, record):
    when = time.strftime("%H:%M:%S", time.localtime(record.created))
    level = "" if record.levelno < logging.WARNING else record.levelname.lower() + ": "
    text = record.getMessage()
    if record.pathname.startswith(self._roots):
      if record.exc_info:
        text += "\n" + self.formatException(record.exc_info)
    else:
      first = text.splitlines()[0] if text.strip() else text
      text = first if len(first) <= _LIBRARY_LINE else first[:_LIBRARY_LINE] + " ..."
    return f"{when} {level}{text}"


class _TqdmHandler(logging.Handler):
  """Writes above the progress bars (tqdm.write), so lines and bars never mix."""

  def emit(self, record):
    try:
      tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


class _OursOrWarnings(logging.Filter):
  """INFO from our code (kimi_jax, launch, bench, configs), WARNING+ from all."""

  def __init__(self, roots):
    super().__init__()
    self._roots = tuple(roots)

  def filter(self, record):
    return record.levelno >= logging.WARNING or record.pathname.startswith(self._roots)


def _our_roots() -> list[str]:
  here = os.path.dirname(os.path.abspath(__file__))
  roots = [here + os.sep]
  repo = os.path.dirname(here)
  roots += [os.path.join(repo, d) + os.sep for d in ("launch", "bench", "configs")]
  main = getattr(sys.modules.get("__main__"), "__file__", None)
  if main:
    roots.append(os.path.dirname(os.path.abspath(main)) + os.sep)
  return roots


def setup_console() -> None:
  """Our log format and filters on the root logger (absl logs through it).
  Called by `run` once flags are parsed; a no-op with --verbose."""
  if _VERBOSE:
    return
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.INFO)
  root = logging.getLogger()
  for handler in list(root.handlers):
    if isinstance(handler, absl_logging.ABSLHandler):
      root.removeHandler(handler)
  roots = _our_roots()
  handler = _TqdmHandler()
  handler.setFormatter(_Formatter(roots))
  handler.addFilter(_OursOrWarnings(roots))
  root.addHandler(handler)
  logging.captureWarnings(True)
  # A library's Python warnings (deprecations) are its maintainers' business.
  logging.getLogger("py.warnings").addFilter(_OursOrWarnings(roots))
  _silence_tensorflow_import()


class _QuietImport:
  """Meta-path hook: the first `import tensorflow` runs with fd 2 captured;
  the known start-up lines are dropped, anything else is written back."""

  def find_spec(self, name, path=None, target=None):
    if name != "tensorflow":
      return None
    sys.meta_path.remove(self)
    spec = None
    for finder in sys.meta_path:
      spec = getattr(finder, "find_spec", lambda *a: None)(name, path, target)
      if spec is not None:
        break
    if spec is None or spec.loader is None:
      return spec
    real = spec.loader.exec_module

    def exec_module(module):
      import tempfile  # pylint: disable=import-outside-toplevel
      sys.stderr.flush()
      saved = os.dup(2)
      with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
          real(module)
        finally:
          os.dup2(saved, 2)
          os.close(saved)
          capture.seek(0)
          kept = [l for l in capture.read().decode("utf-8", "replace").splitlines()
                  if l.strip() and not any(n in l for n in _TF_NOISE)]
          if kept:
            print("\n".join(kept), file=sys.stderr)

    spec.loader.exec_module = exec_module
    return spec


def _silence_tensorflow_import() -> None:
  if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietImport)
                                                 for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietImport())


# -------------------------------------------------------------------- errors


def _config_flag_names() -> list[str]:
  """Flags defined with config_flags.DEFINE_config_file."""
  from ml_collections.config_flags import config_flags  # pylint: disable=import-outside-toplevel
  return [name for name in flags.FLAGS
          if isinstance(flags.FLAGS[name].parser, config_flags.ConfigFileFlagParser)]


def _last_line(text) -> str:
  """The line that says what went wrong (of a message that may hold a traceback)."""
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  return lines[-1] if lines else str(text)


def _flag_error(e: Exception) -> str:
  text = str(e)
  if "Traceback" in text:  # a --config file's get_config raised: ml_collections embeds it
    return f"{text.split(': Error whilst parsing', 1)[0]}: {_last_line(text)}"
  required = re.search(r"Flag (--\w+) must have a value other than None", text)
  if required:
    return f"{required.group(1)} is required"
  return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _flag_value(argv, name: str) -> Optional[str]:
  """The value of --name in argv (the last one, as absl takes it)."""
  value = None
  for i, arg in enumerate(argv):
    for prefix in (f"--{name}=", f"-{name}="):
      if arg.startswith(prefix):
        value = arg[len(prefix):]
    if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _bad_override(argv) -> Optional[str]:
  """The first `--NAME.path` override whose path is not in the loaded config."""
  for name in _config_flag_names():
    value = _flag_value(argv, name)
    if value is None:
      continue
    try:
      config = flags.FLAGS[name].parser.parse(value)
    except Exception:  # pylint: disable=broad-except
      continue  # the config file itself is broken: the caller reports that
    for arg in argv:
      if not arg.lstrip("-").startswith(f"{name}."):
        continue
      path = arg.lstrip("-").split("=", 1)[0][len(name) + 1:]
      node, walked = config, name
      for part in path.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else None
        if keys is None:
          return f"--{name}.{path}: {walked} is a {type(node).__name__}, not a section"
        if part not in keys:
          close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
          hint = (f" (did you mean --{walked}.{close[0]}?)" if close
                  else f"; {walked} has: {', '.join(sorted(keys))}")
          return f"--{name}.{path}: {walked} has no key {part!r}{hint}"
        node, walked = node[part], f"{walked}.{part}"
  return None


def _parse_flags(argv):
  """absl's flag parsing, with every mistake one line and exit code 2."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    fail(_bad_override(argv) or _flag_error(e))
  except (AttributeError, KeyError) as e:
    # ml_collections raises these for an override of a key the config lacks.
    fail(_bad_override(argv) or f"bad --config override: {_last_line(e)}")
  except (ValueError, TypeError, OSError, ImportError, SyntaxError) as e:
    fail(f"{type(e).__name__}: {_last_line(e)}")
  for name in _config_flag_names():
    # A config file that could not be read is reported by ml_collections only
    # when the config is first used; say so now.
    value = flags.FLAGS[name].value
    if type(value).__name__ == "_ErrorConfig":
      fail(f"--{name}={_flag_value(argv, name)}: {_last_line(value._error)}")  # pylint: disable=protected-access
  return rest


def input_error(e: BaseException) -> bool:
  """Whether `e` is bad input the user can fix (see the module docstring)."""
  if isinstance(e, app.UsageError):
    return True
  for module, name in _INPUT_ERRORS:
    cls = getattr(sys.modules.get(module), name, None)
    if cls is not None and isinstance(e, cls):
      return True
  # A path that does not exist, or an output that does (our own checks raise
  # these without an errno).
  return isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                        FileExistsError)) or (isinstance(e, OSError) and e.errno in _MISSING)


def run(main: Callable) -> None:
  """absl.app.run(main) with our console and one-line errors."""

  def wrapped(argv):
    setup_console()
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      if input_error(e):
        fail(str(e), 2)
      if isinstance(e, OSError) and e.filename:
        fail(str(e), 1)  # disk full, read-only, permission: the path is in the message
      raise

  app.run(wrapped, flags_parser=_parse_flags)
