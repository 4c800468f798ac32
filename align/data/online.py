"""Online preference data: every epoch is a round; the current policy renders K images per prompt,
a reward scores them, and the round trains on its own pairs (DPO) or labelled singles (KTO).

Round n (the trainer's epoch n; ``reload_dataloaders_every_n_epochs: 1``) happens when Lightning
asks for the epoch's training loader: each rank renders its share of the round's prompts
(``prompts[rank::world]`` of the round's draw) with the policy's weights at that moment (fixed
seeds: image j of a prompt from seed ``seed + 10_000 * n + j``), scores and pairs them
(``align.data.generated``) into ``<rounds>/round-<n>/rank-<r>/``, and the round reads every rank's
shards through the ordinary Pick-a-Pic or KTO data module. Everything a round writes stays on disk
(images, scores, shards); a resumed run reuses what exists, so it resumes at any point of a round
without rendering or scoring twice. ``rounds`` defaults to ``<run dir>/rounds`` (the first
logger's directory when the config chooses its version).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy

from align.data.generated import check_scorer, plan, score_images, write_planned
from align.data.kto import KTODataModule
from align.data.pickapic import PickAPicDataModule
from align.data.prompt_files import read_prompts
from align.models.sampling import policy_images
from align.rewards.weighted import WeightedReward

log = logging.getLogger(__name__)


class OnlinePreferenceDataModule(L.LightningDataModule):
    """Args:
    prompts: the prompt set (.txt, .jsonl, .csv, .parquet).
    reward: a registry reward or a weighted sum (``pickscore,hps:0.5``); ``sources``: weights.
    method: ``dpo`` (pairs) or ``kto`` (singles: the ceil(``kto_desirable`` K) best of each prompt
        desirable).
    k / pairs / min_margin: images per prompt and how they pair (``align data generate-pairs``).
    prompts_per_round: prompts drawn for each round (None: all of them).
    steps / guidance_scale: the policy's sampler (the model's own scheduler, as an export samples).
    data: the round's data module's arguments (batch_size, resolution, batches_per_epoch, ...).
    batch_size: the round's ``data.batch_size`` set from outside ``data`` (a trainer config such as
        ``configs/trainer/fsdp_sdxl.yaml`` sets ``data.init_args.batch_size`` for every method).
    """

    def __init__(
        self,
        prompts: str,
        reward: str,
        method: str = "dpo",
        sources: dict[str, str] | None = None,
        k: int = 4,
        pairs: str = "best-worst",
        min_margin: float = 0.0,
        kto_desirable: float = 0.5,
        prompts_per_round: int | None = None,
        steps: int = 20,
        guidance_scale: float = 7.5,
        seed: int = 0,
        rounds: str | None = None,
        data: dict | None = None,
        batch_size: int | None = None,
    ):
        super().__init__()
        if method not in ("dpo", "kto"):
            raise ValueError(f"method must be 'dpo' or 'kto', got {method!r}")
        if k < 2:
            raise ValueError(f"k must be at least 2 (a pair needs two images), got {k}")
        self.prompts = read_prompts(prompts)
        if not self.prompts:
            raise ValueError(f"the prompt set {prompts} holds no prompts")
        self.reward_spec, self.sources = reward, sources
        self.reward = WeightedReward(reward, sources)  # an unknown reward fails here, at start
        self.method, self.k, self.pairs, self.min_margin = method, k, pairs, min_margin
        self.kto_desirable, self.prompts_per_round = kto_desirable, prompts_per_round
        self.steps, self.guidance_scale, self.seed = steps, guidance_scale, seed
        self.rounds, self.data = rounds, dict(data or {})
        if batch_size is not None:
            self.data["batch_size"] = batch_size
        self.drop_ties = True  # pairs never hold ties (DPO's check)
        self.batch_size = self.data.get("batch_size", 1)
        self.global_batch_size = self.data.get("global_batch_size")  # accumulation follows
        self.current: L.LightningDataModule | None = None

    # ---- one round -------------------------------------------------------------------------------
    def round_prompts(self, round_index: int) -> list[int]:
        """Indices of the round's prompts (a draw fixed by seed and round)."""
        order = list(range(len(self.prompts)))
        random.Random(f"{self.seed}/{round_index}").shuffle(order)
        return sorted(order[: self.prompts_per_round or len(order)])

    def rounds_dir(self) -> Path:
        if self.rounds is not None:
            return Path(self.rounds)
        # align fit's run directory, else the first logger's (a config that names its version)
        run = getattr(self.trainer, "_align_run_dir", None) or self.trainer.log_dir
        return Path(run or self.trainer.default_root_dir) / "rounds"

    def render(self, round_index: int, folder: Path, indices: list[int]) -> dict:
        """The policy's images of this rank's prompts (kept ones reused): key -> path."""
        module = self.trainer.lightning_module
        images_dir = folder / "images"
        images_dir.mkdir(parents=True, exist_ok=True)
        seeds = [self.seed + 10_000 * round_index + j for j in range(self.k)]
        paths = {(i, s): images_dir / f"{i:05d}_{s}.png" for i in indices for s in seeds}
        todo = [key for key, path in paths.items() if not path.is_file()]
        context = self.trainer.precision_plugin.forward_context()
        batch = max(1, self.batch_size * 2)
        for start in range(0, len(todo), batch):
            keys = todo[start : start + batch]
            images = policy_images(
                module,
                [self.prompts[i] for i, _ in keys],
                [s for _, s in keys],
                self.steps,
                self.guidance_scale,
                context=context,
            )
            for key, image in zip(keys, images):
                tmp = paths[key].with_suffix(".tmp.png")
                image.save(tmp)
                tmp.replace(paths[key])  # atomic: a killed run never leaves half an image
        return paths

    def make_round(self, round_index: int) -> Path:
        """Render, score and write this rank's share of round ``round_index``; returns the round's
        folder (every rank's shares, after a barrier)."""
        trainer = self.trainer
        folder = self.rounds_dir() / f"round-{round_index:03d}"
        mine = folder / f"rank-{trainer.global_rank}"
        indices = self.round_prompts(round_index)[trainer.global_rank :: trainer.world_size]
        check_scorer(mine, {"reward": self.reward_spec, "sources": self.sources})
        paths = self.render(round_index, mine, indices)
        reward = self.reward.to(trainer.lightning_module.device)
        skipped = score_images(paths, self.prompts, reward, mine, 16, progress=False)
        kto = self.kto_desirable if self.method == "kto" else None
        pairs, singles, pair_skips, single_skips = plan(
            mine, self.pairs, self.min_margin, kto, skipped
        )
        kind = "pairs" if self.method == "dpo" else "singles"
        rows, skips = (pairs, pair_skips) if self.method == "dpo" else (singles, single_skips)
        source = {"round": round_index, "rank": trainer.global_rank, "reward": self.reward_spec}
        context = (paths, self.prompts, "policy")
        if rows:
            write_planned(mine / kind, kind, rows, context, source, skips, progress=False)
        log.info(
            "round %d, rank %d: %d %s (skipped %s)",
            round_index,
            trainer.global_rank,
            len(rows),
            kind,
            dict(skips),
        )
        trainer.strategy.barrier("online round")
        return folder

    # ---- what Lightning asks for -----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if isinstance(getattr(self.trainer, "strategy", None), FSDPStrategy):
            raise ValueError(
                "online rounds render each rank's share of the prompts outside the training step, "
                "which FSDP's sharded modules cannot do (every rank must join each all-gather): "
                "train the online methods under DDP"
            )

    def train_dataloader(self):
        if self.trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                "online rounds need trainer.reload_dataloaders_every_n_epochs: 1 (one round an "
                "epoch); otherwise every epoch would replay round 0"
            )
        folder = self.make_round(self.trainer.current_epoch)
        kind = "pairs" if self.method == "dpo" else "singles"
        shards = sorted(str(p) for p in folder.glob(f"rank-*/{kind}/*.tar"))
        if not shards:
            raise RuntimeError(
                f"round {self.trainer.current_epoch} made no {kind} ({folder}): every prompt's "
                "images tied; lower min_margin, raise k, or use another reward"
            )
        if self.method == "dpo":
            self.current = PickAPicDataModule(shards, **self.data)
        else:
            self.current = KTODataModule(shards=shards, **self.data)
        self.current.trainer = self.trainer
        return self.current.train_dataloader()

    def val_dataloader(self):
        return []  # held-out evaluation: align.callbacks.RewardMonitor

    def state_dict(self) -> dict:
        return {}
