"""Resumable stages: each finished stage's result and wall time in DIR/stages.json.

Used by the long2short comparison and the reproduction suites.
`Stages(workdir, label).run(name, fn)` returns the recorded result of a finished
stage without calling `fn`; otherwise it times `fn()` (whose result must be
JSON-able) and records both, atomically, before returning. A stage killed
midway is not recorded, so a rerun starts it again (the RL and SFT stages
then continue from their own checkpoints).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from absl import logging

STAGES_FILE = "stages.json"


class Stages:
  def __init__(self, workdir: str, label: str):
    self.label = label  # names the job in log lines
    self.path = os.path.join(workdir, STAGES_FILE)
    self.done: dict[str, dict] = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        try:
          self.done = json.load(f)
        except json.JSONDecodeError as e:
          raise ValueError(f"{self.path}: not valid JSON ({e}); move it aside to rerun every "
                           "stage") from None

  def run(self, name: str, fn: Callable[[], Any]) -> Any:
    if name in self.done:
      logging.info("%s: stage %s already done (%.0f s)", self.label, name,
                   self.done[name]["seconds"])
      return self.done[name]["result"]
    logging.info("%s: stage %s", self.label, name)
    t = time.perf_counter()
    result = fn()
    self.done[name] = {"seconds": round(time.perf_counter() - t, 1), "result": result}
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.done, f, indent=1)
    os.replace(tmp, self.path)
    logging.info("%s: stage %s done in %.0f s", self.label, name,
                 self.done[name]["seconds"])
    return result

  def seconds(self) -> dict[str, float]:
    return {name: entry["seconds"] for name, entry in self.done.items()}
