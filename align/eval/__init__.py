"""Evaluation: rendering prompt sets with fixed seeds, scoring with reward models, paired win rates
with bootstrap intervals, FID, and the report.

``align sample`` (``align.eval.sampling``) writes image sets in the layout of ``align.eval.layout``;
``align eval`` (``align.eval.evaluate``) scores them and writes ``align.eval.report``'s files.
"""

from align.eval.layout import ImageSet, ImageSetError, scan_image_set
from align.data.prompt_files import PromptSetError, read_prompts
from align.eval.stats import Estimate, cluster_bootstrap, mean_score, paired_win_rate

__all__ = [
    "ImageSet",
    "ImageSetError",
    "scan_image_set",
    "PromptSetError",
    "read_prompts",
    "Estimate",
    "cluster_bootstrap",
    "mean_score",
    "paired_win_rate",
]
