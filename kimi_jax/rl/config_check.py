"""Checking ConfigDict sections against the dataclasses they build.

One-line errors that name the config key: unknown keys (with the closest
known one suggested), wrong types (read from the dataclass annotations) and
what the class's own `__post_init__` rejects, rewritten from
"ClassName.field" to "config.section.key". `settings.from_config` uses it
for every section; launchers catch `ConfigError` (`kimi_jax.cli`).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Optional, Union


class ConfigError(ValueError):
  """A config value that cannot be used; the message names its path."""


def suggest(name: str, known) -> str:
  """' (did you mean 'x'?)' for the closest of `known`, or ''."""
  close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(path: str, given, known) -> None:
  """Every key of section `path` must be known; the first that is not is
  reported with the closest known one (a typo'd override must not be
  silently ignored)."""
  for key in sorted(set(given) - set(known)):
    where = f"config.{path}.{key}" if path else f"config.{key}"
    hint = suggest(key, known) or f"; known: {', '.join(sorted(known))}"
    raise ConfigError(f"{where}: unknown key{hint}")


def expected(value, tp) -> Optional[str]:
  """None when `value` fits annotation `tp`, else what was expected. Types
  this does not know (a library's own classes) are left to the dataclass."""
  if tp is Any or tp is type(None):
    return None if tp is Any or value is None else "None"
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (Union, types.UnionType):
    wants = [expected(value, a) for a in args]
    return None if None in wants else " or ".join(w for w in wants if w)
  if origin is Literal:
    return None if value in args else f"one of {list(args)}"
  if tp is bool:
    return None if isinstance(value, bool) else "True or False"
  if tp is int:
    return None if isinstance(value, int) and not isinstance(value, bool) else "an int"
  if tp is float:
    return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
  if tp is str:
    return None if isinstance(value, str) else "a string"
  if tp is tuple or origin is tuple or tp is list or origin is list:
    return None if isinstance(value, (tuple, list)) else "a list"
  return None


def build(cls, path: str, values: dict, *, renamed=None, also_known=(), **extra):
  """cls(**values, **extra), every mistake reported as one ConfigError that
  names the config key: unknown keys (closest suggested), wrong types (from
  the annotations), and what the class's own checks reject.

  renamed: dataclass field -> config key, where the two differ.
  also_known: other keys of the same section, taken by other classes (so a
    typo of one of them gets its suggestion).
  """
  renamed = renamed or {}
  key_of = lambda field: renamed.get(field, field)
  names = {f.name for f in dataclasses.fields(cls)}
  check_keys(path, {key_of(k) for k in values}, {key_of(n) for n in names} | set(also_known))
  try:
    hints = typing.get_type_hints(cls)
  except Exception:  # pylint: disable=broad-except
    hints = {}  # an annotation this module cannot resolve: leave types to the class
  for field, value in values.items():
    want = expected(value, hints.get(field, Any))
    if want:
      raise ConfigError(f"config.{path}.{key_of(field)} must be {want}, got {value!r} "
                        f"({type(value).__name__})")
  try:
    return cls(**values, **extra)
  except (TypeError, ValueError) as e:
    # Library checks say "ClassName.field must be ..."; say the config key instead.
    msg = re.sub(rf"\b{cls.__name__}\.(\w+)",
                 lambda m: f"config.{path}.{key_of(m.group(1))}", str(e))
    raise ConfigError(msg if msg != str(e) else f"config.{path}: {e}") from None


def take(d: dict, keys) -> dict:
  return {k: d.pop(k) for k in keys if k in d}
