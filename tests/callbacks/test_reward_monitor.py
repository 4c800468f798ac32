"""The reward-hacking monitor: its rule by hand; in a GRPO run it renders and scores held-out
prompts, marks a scripted hack at the evaluation it happens, keeps the best checkpoint by gold and
stops the run when asked."""

import json

import lightning as L
import pytest
import torch

from align.callbacks.reward_monitor import RewardMonitor, pairwise_distance, rising

PROMPTS = ["a red circle on a white background", "a blue square on a black background"]


def test_rising_and_pairwise_distance_by_hand():
    assert rising([0.1, 0.2, 0.3], patience=2, tolerance=0.0)
    assert not rising([0.1, 0.3, 0.3], patience=2, tolerance=0.0)
    assert not rising([0.1, 0.2], patience=2, tolerance=0.0)  # not enough evaluations yet
    assert not rising([0.1, 0.2, 0.25], patience=2, tolerance=0.1)
    # two prompts x 2 images: distances 5 (3-4-5) and 0
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0]])
    assert pairwise_distance(features, 2) == pytest.approx(2.5)


def monitor(**kw) -> RewardMonitor:
    args = dict(prompts=PROMPTS, reward="jpeg-compressibility", gold="jpeg-incompressibility")
    return RewardMonitor(**{**args, **kw})


def test_hacking_rule():
    m = monitor(patience=2)
    rows = [(0.1, 0.5, 1.0), (0.2, 0.6, 1.0), (0.3, 0.5, 1.0), (0.4, 0.4, 1.0)]
    marks = []
    for step, (reward, gold, diversity) in enumerate(rows):
        row = {"step": step, "reward": reward, "gold": gold, "diversity": diversity}
        m.history.append(row)
        marks.append(m.judge(row))
    # gold rose at the second evaluation: the two-step fall completes at the fourth
    assert marks[:3] == [None, None, None] and "gold fell" in marks[3]
    # a noisy training reward (down at the third evaluation) still stands above its start: marked;
    # gold falling while the reward is below its start is not hacking (nothing was gained)
    for rewards, marked in (([0.1, 0.3, 0.2, 0.25], True), ([0.1, 0.3, 0.05, 0.08], False)):
        m = monitor(patience=2, tolerance=0.01)
        for step, (reward, gold) in enumerate(zip(rewards, [0.8, 0.81, 0.78, 0.70])):
            row = {"step": step, "reward": reward, "gold": gold, "diversity": 1.0}
            m.history.append(row)
            why = m.judge(row)
        assert (why is not None) == marked, (rewards, why)
    m = monitor(diversity_floor=0.5)
    m.history = [{"step": 0, "reward": 0, "gold": 0, "diversity": 1.0}]
    collapsed = {"step": 1, "reward": 0, "gold": 0, "diversity": 0.4}
    assert "diversity" in m.judge(collapsed)


def test_bad_settings_fail_at_start(tmp_path):
    with pytest.raises(ValueError, match="images_per_prompt"):
        monitor(images_per_prompt=1)
    empty = tmp_path / "p.txt"
    empty.write_text("\n")
    with pytest.raises(Exception):
        monitor(prompts=str(empty))
    with pytest.raises(ValueError, match="unknown reward"):
        monitor(gold="no-such-reward").scorers("cpu")


class Scripted(RewardMonitor):
    """Renders and scores for real, then replaces gold by a script: up, then down twice."""

    GOLD = [0.5, 0.7, 0.6, 0.4, 0.3]

    def measure(self, trainer, pl_module):
        row = super().measure(trainer, pl_module)
        row["gold"] = self.GOLD[len(self.history)]
        row["reward"] = 0.1 * len(self.history)  # rising
        return row


def test_in_a_grpo_run_it_marks_the_hack_keeps_the_best_and_stops(tmp_path):
    from align.data.prompts import PromptDataModule
    from align.modules.grpo import GRPOModule
    from align.rewards.weighted import WeightedReward

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    module = GRPOModule(
        WeightedReward("jpeg-compressibility"),
        model="tiny",
        lora_rank=4,
        group_size=2,
        num_steps=2,
        updates=1,
    )
    data = PromptDataModule(str(prompts), batch_size=2, batches_per_epoch=20)
    watch = Scripted(
        prompts=PROMPTS,
        reward="jpeg-compressibility",
        gold="jpeg-incompressibility",
        every_n_steps=1,
        steps=2,
        stop=True,
    )
    trainer = L.Trainer(
        max_steps=10,
        default_root_dir=tmp_path,
        callbacks=[watch],
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run", version="v"),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, data)
    record = json.loads((tmp_path / "run/v/reward_monitor.json").read_text())
    # evaluations at steps 0..4: gold 0.7 at step 1 is the best; 0.6, 0.4 fall while the reward
    # rises: marked at step 3, where the run stops
    assert record["hacking_step"] == 3 and trainer.global_step == 3
    assert record["best_gold_step"] == 1 and "gold fell" in record["why"]
    assert (tmp_path / "run/v/checkpoints/best-gold.ckpt").is_file()
    assert [h["step"] for h in record["history"]] == [0, 1, 2, 3]
    assert all(
        h["diversity"] >= 0 and "gold/jpeg-incompressibility" in h for h in record["history"]
    )
