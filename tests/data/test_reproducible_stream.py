"""The sample stream repeats exactly for a seed: webdataset's shuffle buffer is seeded (it defaults
to the pid and the clock), and stream mixing does not depend on Python's per-process string
hashing."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
from align.data.pickapic import PickAPicDataModule
root = sys.argv[1]
dm = PickAPicDataModule(train_shards=root, batch_size=4, resolution=32, num_workers=0,
                        batches_per_epoch=3, shuffle_buffer=8, seed=5)
print([c for b in dm.train_dataloader() for c in b["caption"]])
"""


def test_same_seed_same_batches_in_separate_processes(tmp_path):
    from helpers import pair_sample, write_tar

    for s in range(2):
        write_tar(
            tmp_path / f"pairs-{s:06d}.tar",
            [pair_sample(f"{s}-{i}", caption=f"caption {s}-{i}") for i in range(12)],
        )
    runs = [
        subprocess.run(
            [sys.executable, "-c", SCRIPT, str(tmp_path)],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONPATH": "tests", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        )
        .stdout.strip()
        .splitlines()[-1]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert len(eval(runs[0])) == 12
