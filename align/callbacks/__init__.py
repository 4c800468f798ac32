"""Lightning callbacks: diffusers export, throughput, the end-of-run artifact summary, validation
images, the reward-hacking monitor, the online reference refresh, and the survival kit (divergence
guard, pre-emption checkpoint, atomic checkpoint writes)."""

from align.callbacks.artifacts import ArtifactSummary
from align.callbacks.export import DiffusersExport
from align.callbacks.reference import RefreshReference
from align.callbacks.reward_monitor import RewardMonitor
from align.callbacks.survival import NonFiniteGuard, Preemption
from align.callbacks.throughput import Throughput
from align.callbacks.validation_images import ValidationImages

__all__ = [
    "ArtifactSummary",
    "DiffusersExport",
    "NonFiniteGuard",
    "Preemption",
    "RefreshReference",
    "RewardMonitor",
    "Throughput",
    "ValidationImages",
]
