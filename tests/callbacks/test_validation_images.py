"""The training-time validation callback: policy and reference side by side, reward scores,
every N steps."""

import lightning as L
import torch
from PIL import Image
from lightning.pytorch.loggers import Logger

from align.callbacks import ValidationImages
from align.data.pickapic import PickAPicDataModule
from align.modules import DPOModule
from align.rewards.tiny import write_tiny_hf_clip


class RecordingLogger(Logger):
    name, version = "rec", "0"

    def __init__(self, root):
        super().__init__()
        self.root, self.images, self.metrics = str(root), [], []

    @property
    def save_dir(self):
        return self.root

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, step, images))


def test_logs_policy_and_reference_side_by_side_with_reward_scores(tmp_path, pair_shards):
    clip_dir = write_tiny_hf_clip(tmp_path / "clip")
    logger = RecordingLogger(tmp_path)
    callback = ValidationImages(
        prompts=["a red circle", "a blue square"],
        every_n_steps=2,
        steps=2,
        reward="clip",
        reward_source=str(clip_dir),
        at_end=False,
    )
    module = DPOModule(model="tiny", optimizer=lambda p: torch.optim.SGD(p, lr=1e-3))
    data = PickAPicDataModule(
        str(pair_shards), batch_size=2, resolution=32, num_workers=0, batches_per_epoch=4
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, data)
    assert [step for _, step, _ in logger.images] == [2, 4]
    key, _, images = logger.images[0]
    # 32 px policy | reference, enlarged 4x under a 14 px label strip
    assert key == "val/images" and len(images) == 2 and images[0].size == (256, 142)
    left, right = images[0].crop((0, 14, 128, 142)), images[0].crop((128, 14, 256, 142))
    assert left.resize((32, 32), Image.NEAREST).resize((128, 128), Image.NEAREST) == left
    assert list(left.getdata()) != list(right.getdata())  # the policy moved away from the reference
    rewards = [m for _, m in logger.metrics if "val/reward/clip/policy" in m]
    assert len(rewards) == 2 and all("val/reward/clip/reference" in m for m in rewards)
    assert (tmp_path / "rec" / "0" / "images" / "step-000002" / "00.png").exists()
