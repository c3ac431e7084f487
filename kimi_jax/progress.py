"""Progress bars for long work: tqdm, drawn only on a terminal.

In a log file a bar's carriage returns are noise (every redraw is kept), and
the launchers already log one line per iteration or stage, so off a terminal
the bar is disabled. No side effects at import: library code may use it.
"""

import sys

from tqdm import tqdm


def bar(iterable=None, **kw) -> tqdm:
  """tqdm(iterable, **kw), disabled unless stderr is a terminal."""
  kw.setdefault("dynamic_ncols", True)
  if kw.get("disable") is not True and not sys.stderr.isatty():
    kw["disable"] = True
  return tqdm(iterable, **kw)
