"""The memory arithmetic the real-model recipes state holds: their train step
compiled (not run) with abstract shapes, SPMD over the CPU's fake devices,
for the recipe's own model, row length and long-context settings.

XLA's per-device peak (`compile_memory.Memory.peak`) must be within 20% of
the `MEMORY_GIB` number in the recipe file and below a chip's HBM. Nothing is
allocated: an 8B model at 32k tokens compiles in seconds (its 32 layers are
one scan body)."""
import json

import jax
import pytest

from configs import llama3_8b_pod, qwen2_5_math_1_5b
from kimi_jax import compile_memory, parallel
from kimi_jax.rl import settings
from test_recipes import REAL_CONFIGS  # the published config.json of each model

GiB = 1 << 30
CASES = [("qwen2", qwen2_5_math_1_5b, "", qwen2_5_math_1_5b.MEMORY_GIB),
         ("llama", llama3_8b_pod, "", llama3_8b_pod.MEMORY_GIB[""]),
         ("llama", llama3_8b_pod, "32k", llama3_8b_pod.MEMORY_GIB["32k"])]


@pytest.mark.parametrize("family,recipe,variant,stated", CASES,
                         ids=["qwen2_5_math_1_5b", "llama3_8b_pod", "llama3_8b_pod:32k"])
def test_recipe_train_step_fits_the_memory_it_states(tmp_path, family, recipe, variant, stated):
  (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIGS[family]))
  c = recipe.get_config(variant)
  c.model.hf_path = str(tmp_path)
  s = settings.from_config(c)
  assert s.model.scan_layers and s.model.remat == "full" and s.model.logits_chunk > 0
  data, fsdp, tensor = stated["mesh"]
  mesh = parallel.make_mesh(parallel.MeshConfig(data, fsdp, tensor),
                            jax.devices()[:data * fsdp * tensor])
  rows = data * fsdp * stated["rows_per_device"]
  m = compile_memory.train_step_memory(s.model, s.scheduler.max_length, rows=rows,
                                       layout=parallel.Layout.train(mesh, s.model))
  peak = m.peak / GiB
  assert abs(peak - stated["peak_per_device"]) <= 0.2 * stated["peak_per_device"], (
      f"compiled peak {peak:.1f} GiB per device, the recipe states "
      f"{stated['peak_per_device']} GiB (temp {m.temp / GiB:.1f}, inputs {m.argument / GiB:.1f})")
  assert stated["peak_per_device"] < stated["hbm_per_chip"]
