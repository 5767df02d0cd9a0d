"""Real models' parameter shapes (no framework needed): torchvision's ResNet-18 and GPT-2 small.

Used by ``benchmarks/bridge_speed.py --models`` (the bridge on real shapes) and
``benchmarks/compile_time.py`` (first-step compile time on them). Names are the frameworks' own
(``layer1.0.conv1.weight``, ``h.0.attn.c_attn.weight``); :func:`nested` turns them into the
``{module: {leaf: shape}}`` tree a JAX user has, with the module order; :func:`flax_layout`
gives a torch model's leaves the names and layouts Flax gives the same layers.
"""

from __future__ import annotations


def resnet18_shapes():
  """torchvision ResNet-18's parameter shapes (11.7M; conv kernels (out, in, kh, kw))."""
  shapes = {"conv1.weight": (64, 3, 7, 7), "bn1.weight": (64,), "bn1.bias": (64,)}
  cin = 64
  for li, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
    for b in range(2):
      pre = f"layer{li}.{b}."
      shapes[pre + "conv1.weight"] = (cout, cin if b == 0 else cout, 3, 3)
      shapes[pre + "bn1.weight"] = shapes[pre + "bn1.bias"] = (cout,)
      shapes[pre + "conv2.weight"] = (cout, cout, 3, 3)
      shapes[pre + "bn2.weight"] = shapes[pre + "bn2.bias"] = (cout,)
      if b == 0 and (stride != 1 or cin != cout):
        shapes[pre + "downsample.0.weight"] = (cout, cin, 1, 1)
        shapes[pre + "downsample.1.weight"] = shapes[pre + "downsample.1.bias"] = (cout,)
    cin = cout
  shapes["fc.weight"], shapes["fc.bias"] = (1000, 512), (1000,)
  return shapes


def gpt2_small_shapes():
  """GPT-2 small's parameter shapes (124M; Hugging Face Conv1D weights are (in, out))."""
  d, v, ctx = 768, 50257, 1024
  shapes = {"wte.weight": (v, d), "wpe.weight": (ctx, d)}
  for i in range(12):
    pre = f"h.{i}."
    for ln in ("ln_1", "ln_2"):
      shapes[pre + ln + ".weight"] = shapes[pre + ln + ".bias"] = (d,)
    shapes[pre + "attn.c_attn.weight"], shapes[pre + "attn.c_attn.bias"] = (d, 3 * d), (3 * d,)
    shapes[pre + "attn.c_proj.weight"], shapes[pre + "attn.c_proj.bias"] = (d, d), (d,)
    shapes[pre + "mlp.c_fc.weight"], shapes[pre + "mlp.c_fc.bias"] = (d, 4 * d), (4 * d,)
    shapes[pre + "mlp.c_proj.weight"], shapes[pre + "mlp.c_proj.bias"] = (4 * d, d), (d,)
  shapes["ln_f.weight"] = shapes["ln_f.bias"] = (d,)
  return shapes


def flax_layout(shapes: dict) -> dict:
  """A torch model's ``{"module.path.leaf": shape}`` in Flax's names and layouts: a conv weight
  ``(out, in, kh, kw)`` is a ``kernel`` ``(kh, kw, in, out)``, a linear weight ``(out, in)`` a
  ``kernel`` ``(in, out)``, a norm's 1-D ``weight`` its ``scale``; biases are unchanged. (For
  torch models only: Hugging Face GPT-2's ``Conv1D`` weights are ``(in, out)`` already.)"""
  out = {}
  for name, shape in shapes.items():
    module, leaf = name.rsplit(".", 1)
    if leaf == "weight" and len(shape) == 4:
      leaf, shape = "kernel", (shape[2], shape[3], shape[1], shape[0])
    elif leaf == "weight" and len(shape) == 2:
      leaf, shape = "kernel", (shape[1], shape[0])
    elif leaf == "weight" and len(shape) == 1:
      leaf = "scale"
    out[f"{module}.{leaf}"] = tuple(shape)
  return out


def nested(shapes: dict) -> tuple[dict, list]:
  """``({module: {leaf: shape}}, module order)`` of flat ``{"module.path.leaf": shape}``."""
  tree: dict = {}
  for name, shape in shapes.items():
    module, leaf = name.rsplit(".", 1)
    tree.setdefault(module, {})[leaf] = shape
  return tree, list(tree)
