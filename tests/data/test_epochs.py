"""Data epochs (align.data.epochs): every sample once per pass across ranks and workers, a new order
each pass, a resume that continues the stream, whole accumulation windows, the global batch."""

import lightning as L
import pytest
import torch

from align.data import PickAPicDataModule
from align.data.batching import accumulation_for
from align.data.epochs import shard_sizes
from align.data.synthetic import write_synthetic_pickapic

PAIRS = 48


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("epochs")
    write_synthetic_pickapic(out, pairs=PAIRS, shards=4, resolution=16, tie_fraction=0.0, seed=3)
    return out


def module(shards, **kwargs):
    args = dict(batch_size=2, resolution=16, num_workers=0, shuffle_buffer=8, crop="center")
    return PickAPicDataModule(str(shards), **{**args, **kwargs})


def epoch_keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_three_epochs_see_every_pair_once_in_a_new_order(shards, workers, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    loaders = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        loaders.append(module(shards, num_workers=workers).train_dataloader())
    orders = []
    for _ in range(3):
        per_rank = [epoch_keys(loader) for loader in loaders]
        assert len(per_rank[0]) == len(per_rank[1])  # equal batch counts: no DDP hang
        everything = per_rank[0] + per_rank[1]
        assert len(everything) == len(set(everything)) == PAIRS  # 48 = 2 ranks x 2 workers x 2 x 6
        orders.append(per_rank[0])
    assert orders[0] != orders[1] != orders[2]


def test_a_pass_of_the_plan_does_not_depend_on_the_worker_count(shards):
    assert sorted(epoch_keys(module(shards, num_workers=0).train_dataloader())) == sorted(
        epoch_keys(module(shards, num_workers=2).train_dataloader())
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_the_stream(shards, workers):
    straight = module(shards, num_workers=workers).train_dataloader()
    first, second = epoch_keys(straight), epoch_keys(straight)
    resumed = module(shards, num_workers=workers).train_dataloader()
    resumed.load_state_dict({"epoch": 1, "batch": 5, "batches_per_epoch": len(resumed)})
    # 5 batches of 2 already trained on; odd: workers rotate
    assert epoch_keys(resumed) == second[5 * 2 :]
    assert epoch_keys(resumed) != first  # and the next epoch follows
    with pytest.raises(ValueError, match="batches per epoch"):
        resumed.load_state_dict({"epoch": 1, "batch": 5, "batches_per_epoch": len(resumed) + 1})


def test_batches_per_epoch_is_an_override_and_passes_continue_across_epochs(shards):
    loader = module(shards, batches_per_epoch=5).train_dataloader()
    assert len(loader) == 5
    keys = [epoch_keys(loader) for _ in range(5)]  # 25 batches of 2 over a pass of 24
    flat = [k for epoch in keys for k in epoch]
    assert len(set(flat[:PAIRS])) == PAIRS  # the first pass is whole although it spans epochs


def test_epochs_are_whole_accumulation_windows(shards):
    dm = module(shards)
    stream = dm.stream(train=True)
    stream.multiple_of = 5
    assert len(stream) == 20  # 24 batches a pass -> 4 whole windows of 5


def test_manifest_counts_are_used_and_a_stale_manifest_is_refused(shards, tmp_path):
    import json
    import shutil

    for tar in shards.glob("*.tar"):
        shutil.copy(tar, tmp_path / tar.name)
    urls = sorted(str(p) for p in tmp_path.glob("*.tar"))
    counted = shard_sizes(urls)
    records = {
        p.split("/")[-1]: {"samples": 99, "bytes": (tmp_path / p.split("/")[-1]).stat().st_size}
        for p in urls
    }
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": records}))
    # the manifest is trusted when it matches
    assert counted == [12] * 4 and shard_sizes(urls) == [99] * 4
    records[urls[0].split("/")[-1]]["bytes"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": records}))
    with pytest.raises(ValueError, match="lists .* bytes"):
        shard_sizes(urls)


def test_missing_shards_of_a_brace_pattern_are_named(shards):
    with pytest.raises(FileNotFoundError, match="2 of 6 shards.*pairs-000005.tar"):
        module(f"{shards}/pairs-{{000000..000005}}.tar")


def test_accumulation_follows_the_global_batch():
    assert accumulation_for(2048, 1, 16) == (128, 2048)
    assert accumulation_for(2048, 1, 4) == (512, 2048)
    assert accumulation_for(2048, 1, 6) == (341, 2046)  # the nearest reachable
    with pytest.raises(ValueError, match="global_batch_size 8 cannot be reached.*16 x 1 = 16"):
        accumulation_for(8, 1, 16)


class KeyRecorder(L.LightningModule):
    """A trivial module that records the batches it trains on and the optimizer steps it takes."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.keys, self.steps = [], 0

    def training_step(self, batch, batch_idx):
        self.keys.append(list(batch["key"]))
        return (self.weight - batch["pixel_values"].mean()) ** 2

    def optimizer_step(self, *args, **kwargs):
        self.steps += 1
        super().optimizer_step(*args, **kwargs)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(tmp_path, **kwargs):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_lightning_steps_only_on_whole_windows_and_resumes_the_data_exactly(shards, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    straight = KeyRecorder()
    trainer(tmp_path / "a", max_epochs=3, accumulate_grad_batches=5).fit(straight, module(shards))
    # 24 batches -> 20 per epoch, 4 windows
    assert len(straight.keys) == 3 * 20 and straight.steps == 12
    flat = [k for b in straight.keys for k in b]
    # the stream goes on across epochs: no pair dropped
    passes = [flat[:PAIRS], flat[PAIRS : 2 * PAIRS]]
    assert all(len(set(p)) == PAIRS for p in passes) and passes[0] != passes[1]

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = KeyRecorder()
    trainer(tmp_path / "b", max_steps=7, accumulate_grad_batches=5, callbacks=[ckpt]).fit(
        first, module(shards)
    )
    resumed = KeyRecorder()  # step 6 is mid-epoch 1 (4 steps an epoch)
    trainer(tmp_path / "c", max_epochs=3, accumulate_grad_batches=5).fit(
        resumed, module(shards), ckpt_path=str(tmp_path / "ckpt" / "epoch=1-step=6.ckpt")
    )
    assert resumed.keys == straight.keys[6 * 5 :]
