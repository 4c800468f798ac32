"""Session 9 diagnostic (docs/demo/findings.md §11): what a base draws for each colour a caption names.
Samples the base on the 39 validation captions x 8 seeds (2000-2007; DDIM 10 steps, CFG as given) and reads
every captioned cell back with the judge: rows are the caption's colour, columns the colour read (None: empty).
Also counts shapes read in cells that hold an object, and checks that the base's VAE is not the cause: 200 rendered
scenes encoded and decoded, every object's colour read back.

    python docs/demo/diagnostics/colour_confusion.py BASE_DIR [CFG]      # ~40 s
"""
import collections
import random
import sys

import numpy as np
import torch

from align.demo import world
from align.demo.evaluate import make_pipeline, sample
from align.demo.judge import parse_caption, read_image
from align.demo.run import DemoConfig, caption_sets
from align.models import load_components

SEEDS = list(range(2000, 2008))


def vae_round_trip(vae, n: int = 200) -> str:
    rng = random.Random(0)
    scenes = [world.random_scene(rng, max_objects=2) for _ in range(n)]
    x = torch.from_numpy(np.stack([np.asarray(world.render(s, rng)) for s in scenes])).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        out = vae.decode(vae.encode(x).latent_dist.mode()).sample
    out = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    right = sum(read_image(im)[o.cell].color == o.color for s, im in zip(scenes, out) for o in s)
    return f"VAE round trip: {right} of {sum(len(s) for s in scenes)} object colours read back right"


if __name__ == "__main__":
    torch.set_num_threads(1)
    base = load_components(sys.argv[1])
    _, captions = caption_sets(DemoConfig(eval_set="validation"))
    guidance = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
    images = iter(sample(make_pipeline(base), captions, SEEDS, steps=10, guidance=guidance))
    colours, shapes = collections.Counter(), collections.Counter()
    for caption in captions:
        objs = parse_caption(caption)
        for _ in SEEDS:
            reading = read_image(next(images))
            for o in objs:
                colours[(o.color, reading[o.cell].color)] += 1
                if reading[o.cell].color is not None:
                    shapes[(o.shape, reading[o.cell].shape)] += 1
    read_as = [*world.COLORS, None]
    print(f"CFG {guidance}: caption colour -> read as {read_as}")
    for named in world.COLORS:
        print(f"  {named:7s}", [colours[(named, r)] for r in read_as])
    print("shapes (captioned, read):", dict(shapes))
    print(vae_round_trip(base.vae))
