"""``python -m mstfx.passes``: print the pass pipeline, in the order it runs."""

from .driver import PASS_ORDER

for name in PASS_ORDER:
    print(name)
