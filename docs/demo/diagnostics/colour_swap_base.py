"""Session 9 diagnostic (docs/demo/findings.md §11): a base that cannot tell red from yellow or green from blue
from its captions, so that only the preferences carry that information. Each object's colour word in the base's
training captions is replaced by its partner (red <-> yellow, green <-> blue) with probability P_SWAP (0.5: the
word says nothing within a pair; CFG cannot sharpen what the captions do not say), no other colour noise; then
DPO, KTO and their flipped controls at the report's settings, 2 training seeds, judged on the validation split.

    python docs/demo/diagnostics/colour_swap_base.py OUT [METHODS] [P_SWAP]   # base ~7 min, runs ~8 min
"""
import sys

from align.demo import world
from align.demo.base import BaseConfig
from align.demo.run import DemoConfig, run_demo

PARTNER = {"red": "yellow", "yellow": "red", "green": "blue", "blue": "green"}
P_SWAP = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
_noisy_scene = world.noisy_scene


def swapped_scene(scene, rng, p_color, p_shape):
    out = _noisy_scene(scene, rng, p_color, p_shape)
    return tuple(world.Obj(o.cell, PARTNER[o.color] if rng.random() < P_SWAP else o.color, o.shape) for o in out)


if __name__ == "__main__":  # the training runs' spawned workers import this file: they must not run it
    world.noisy_scene = swapped_scene  # the base is trained in this process; the workers only read it
    methods = tuple(sys.argv[2].split(",")) if len(sys.argv) > 2 else ("dpo", "dpo-flipped", "kto", "kto-flipped")
    cfg = DemoConfig(out=sys.argv[1] + "/report", artifacts=sys.argv[1] + "/art", seeds=2, eval_set="validation",
                     base=BaseConfig(p_color=0.0), methods=methods)
    run_demo(cfg, command="docs/demo/diagnostics/colour_swap_base.py " + " ".join(sys.argv[1:]))
