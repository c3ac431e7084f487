"""The comparison's summary: DIR/long2short.json and DIR/plots/long2short.png (report Fig. 7).

Every model is one point: x = mean response tokens on the held-out prompts,
y = pass@1 (averaged over samples). The verdict compares long2short RL with
the long model: the issue's target is an accuracy within 2 points at no
more than 60% of the long model's mean tokens; the report's finding is that
RL gives the best accuracy per token, read here as "on the accuracy-tokens
Pareto front and the highest accuracy / token ratio among the short models".
"""
from __future__ import annotations

import json
import os
from typing import Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# The models of Fig. 7, in plot / table order, and their labels.
LABELS = {"long": "long CoT", "short": "short CoT", "merge": "merge",
          "merge_rs": "merge + RS", "rs": "shortest RS", "dpo": "DPO",
          "l2s_rl": "long2short RL", "more_rl": "long + RL (control)"}
SHORTENED = ("merge", "merge_rs", "rs", "dpo", "l2s_rl")  # the long2short methods
# more_rl, the control (the long model's own RL continued for as many
# iterations), is plotted and tabled but is no long2short method.
TARGET_POINTS, TARGET_TOKEN_SHARE = 0.02, 0.60


def pareto(points: Mapping[str, tuple[float, float]]) -> list[str]:
  """Names of the (tokens, accuracy) points no other point dominates (fewer
  or equal tokens and higher or equal accuracy, one of them strictly)."""
  def dominated(a):
    ta, aa = points[a]
    return any(tb <= ta and ab >= aa and (tb < ta or ab > aa)
               for b, (tb, ab) in points.items() if b != a)
  return [n for n in points if not dominated(n)]


def summarize(evals: Mapping[str, dict]) -> dict:
  """The JSON summary of {model: evaluation metrics}."""
  models = {}
  for name in LABELS:
    if name not in evals:
      continue
    m = evals[name]
    models[name] = {"label": LABELS[name], "accuracy": m["eval/accuracy"],
                    "response_tokens_mean": m["eval/response_tokens_mean"],
                    "per_difficulty": {k[len("eval/"):]: v for k, v in sorted(m.items())
                                       if k.startswith(("eval/accuracy_d",
                                                        "eval/response_tokens_d"))}}
  out = {"models": models}
  if "long" in models:
    base = models["long"]
    for m in models.values():
      m["accuracy_vs_long"] = m["accuracy"] - base["accuracy"]
      m["token_share_vs_long"] = m["response_tokens_mean"] / base["response_tokens_mean"]
  for m in models.values():
    m["accuracy_per_100_tokens"] = 100 * m["accuracy"] / max(m["response_tokens_mean"], 1e-9)
  front = pareto({n: (m["response_tokens_mean"], m["accuracy"]) for n, m in models.items()})
  out["pareto_front"] = front
  if "long" in models and "l2s_rl" in models:
    rl = models["l2s_rl"]
    short = {n: models[n]["accuracy_per_100_tokens"] for n in SHORTENED if n in models}
    out["verdict"] = {
        "target": f"long2short RL within {100 * TARGET_POINTS:.0f} points of the long model's "
                  f"accuracy at <= {100 * TARGET_TOKEN_SHARE:.0f}% of its mean tokens",
        "accuracy_points_vs_long": 100 * rl["accuracy_vs_long"],
        "token_share_vs_long": rl["token_share_vs_long"],
        "target_met": bool(rl["accuracy_vs_long"] >= -TARGET_POINTS
                           and rl["token_share_vs_long"] <= TARGET_TOKEN_SHARE),
        "rl_on_pareto_front": "l2s_rl" in front,
        "rl_best_accuracy_per_token": max(short, key=short.get) == "l2s_rl",
    }
    if "more_rl" in models:
      ctl = models["more_rl"]
      out["verdict"]["vs_control"] = {
          "accuracy_points": 100 * (rl["accuracy"] - ctl["accuracy"]),
          "token_share": rl["response_tokens_mean"] / max(ctl["response_tokens_mean"], 1e-9),
          "control_meets_target": bool(ctl["accuracy_vs_long"] >= -TARGET_POINTS
                                       and ctl["token_share_vs_long"] <= TARGET_TOKEN_SHARE)}
  return out


def table(summary: dict) -> str:
  """A Markdown table: model, accuracy, mean tokens, vs long."""
  lines = ["| model | pass@1 | mean tokens | accuracy vs long (points) | tokens vs long |",
           "|---|---|---|---|---|"]
  for m in summary["models"].values():
    vs = (f"{100 * m['accuracy_vs_long']:+.1f} | {100 * m['token_share_vs_long']:.0f}%"
          if "accuracy_vs_long" in m else "- | -")
    lines.append(f"| {m['label']} | {m['accuracy']:.3f} | {m['response_tokens_mean']:.1f} | "
                 f"{vs} |")
  return "\n".join(lines)


def write(summary: dict, workdir: str) -> tuple[str, str]:
  """Writes DIR/long2short.json and DIR/plots/long2short.png atomically."""
  path = os.path.join(workdir, "long2short.json")
  with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=1)
  os.replace(path + ".tmp", path)
  plot = os.path.join(workdir, "plots", "long2short.png")
  os.makedirs(os.path.dirname(plot), exist_ok=True)
  fig = Figure(figsize=(6.4, 4.4), dpi=110, layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  placed = []  # (x, y) scaled to [0, 1] of the points labelled so far
  xs = [m["response_tokens_mean"] for m in summary["models"].values()] or [1.0]
  ys = [m["accuracy"] for m in summary["models"].values()] or [1.0]
  x_span, y_span = max(max(xs) - min(xs), 1e-9), max(max(ys) - min(ys), 1e-9)
  for name, m in summary["models"].items():
    x, y = m["response_tokens_mean"], m["accuracy"]
    marker = {"l2s_rl": "*", "more_rl": "x"}.get(name, "o")
    ax.scatter([x], [y], s=60 if name == "l2s_rl" else 36, zorder=3, marker=marker,
               label=m["label"])
    # Labels of nearby points stack upwards instead of on top of one another.
    here = ((x - min(xs)) / x_span, (y - min(ys)) / y_span)
    near = sum(abs(here[0] - a) < 0.12 and abs(here[1] - b) < 0.06 for a, b in placed)
    placed.append(here)
    ax.annotate(m["label"], (x, y), textcoords="offset points", xytext=(5, 4 + 11 * near),
                fontsize=8)
  front = sorted((summary["models"][n]["response_tokens_mean"], summary["models"][n]["accuracy"])
                 for n in summary["pareto_front"])
  ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, alpha=0.5,
          label="Pareto front", zorder=2)
  ax.set_xlabel("mean response tokens (held-out)")
  ax.set_ylabel("pass@1 (held-out)")
  ax.set_title("long2short: accuracy vs response length")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="small", loc="best")
  fig.savefig(plot + ".tmp", format="png")
  os.replace(plot + ".tmp", plot)
  return path, plot
