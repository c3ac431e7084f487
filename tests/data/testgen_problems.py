"""Four small stdin/stdout problems for tests/test_testgen.py.

Each: a generator (source defining `generate(seed) -> str`, as a model
would write it), reference solutions, and what automatic test generation
must conclude with the report's fractions (7/10 agree per test, 9/10 pass
all) applied to the references given:
  add       four correct references (one prints trailing spaces): kept.
  sort      one reference sorts as strings (wrong on most inputs): every
            test still gets the right output, the problem is dropped.
  distinct  one reference prints a set in hash order (nondeterministic):
            same outcome as `sort`.
  argmax    "print an index of the maximum" needs a special judge: half the
            references print the first index, half the last, so inputs
            with a tied maximum get no test; a kept test is never one of
            them.
"""

ADD = dict(
    name="add",
    generator="""
import random
def generate(seed):
  rng = random.Random(seed)
  return f"{rng.randint(-1000, 1000)} {rng.randint(-1000, 1000)}\\n"
""",
    references=[
        "a, b = map(int, input().split())\nprint(a + b)\n",
        "import sys\nprint(sum(int(t) for t in sys.stdin.read().split()))\n",
        "x = input().split()\nprint(int(x[0]) - (-int(x[1])), end='  \\n')\n",
        "def main():\n  a, b = (int(t) for t in input().split())\n  print(b + a)\nmain()\n",
    ],
    kept=True,
    solve=lambda text: f"{sum(map(int, text.split()))}\n",
)

SORT = dict(
    name="sort",
    generator="""
import random
def generate(seed):
  rng = random.Random(seed)
  xs = [rng.randint(-50, 120) for _ in range(rng.randint(4, 7))]
  return f"{len(xs)}\\n{' '.join(map(str, xs))}\\n"
""",
    references=[
        "input()\nprint(*sorted(map(int, input().split())))\n",
        "n = int(input())\nxs = list(map(int, input().split()))\nxs.sort()\nprint(' '.join(map(str, xs)))\n",
        "import sys\nd = sys.stdin.read().split()\nprint(*sorted(int(t) for t in d[1:]))\n",
        # Wrong: lexicographic order ("-3" < "-40" < "100" < "7").
        "input()\nprint(*sorted(input().split()))\n",
    ],
    kept=False,
    solve=lambda text: " ".join(map(str, sorted(map(int, text.split()[1:])))) + "\n",
)

DISTINCT = dict(
    name="distinct",
    generator="""
import random
WORDS = "ant bee cat dog eel fox gnu hen ibis jay kiwi".split()
def generate(seed):
  rng = random.Random(seed)
  words = rng.sample(WORDS, 6) + rng.sample(WORDS, 3)
  rng.shuffle(words)
  return " ".join(words) + "\\n"
""",
    references=[
        "print(*sorted(set(input().split())))\n",
        "ws = input().split()\nout = []\nfor w in sorted(ws):\n  if not out or out[-1] != w:\n    out.append(w)\nprint(' '.join(out))\n",
        "import sys\nprint(' '.join(sorted(dict.fromkeys(sys.stdin.read().split()))))\n",
        # Nondeterministic: str hashes are salted per process, so set order
        # changes from run to run (at least 6 words: 1/720 to be sorted).
        "print(*set(input().split()))\n",
    ],
    kept=False,
    solve=lambda text: " ".join(sorted(set(text.split()))) + "\n",
)

ARGMAX = dict(
    name="argmax",
    generator="""
import random
def generate(seed):
  rng = random.Random(seed)
  # Small values: a tied maximum on about half the inputs.
  xs = [rng.randint(0, 4) for _ in range(5)]
  return " ".join(map(str, xs)) + "\\n"
""",
    references=[
        "xs = list(map(int, input().split()))\nprint(xs.index(max(xs)))\n",
        "xs = list(map(int, input().split()))\nbest = 0\nfor i, x in enumerate(xs):\n  if x > xs[best]:\n    best = i\nprint(best)\n",
        "xs = list(map(int, input().split()))\nprint(len(xs) - 1 - xs[::-1].index(max(xs)))\n",
        "xs = list(map(int, input().split()))\nprint(max(range(len(xs)), key=lambda i: (xs[i], i)))\n",
    ],
    kept=False,
    solve=lambda text: (lambda xs: f"{xs.index(max(xs))}\n")(list(map(int, text.split()))),
)

PROBLEMS = (ADD, SORT, DISTINCT, ARGMAX)
