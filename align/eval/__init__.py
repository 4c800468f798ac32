"""Evaluation: rendering prompt sets with fixed seeds, scoring with reward models, paired win rates
with bootstrap intervals, FID, and the report.

``align sample`` (``align.eval.sampling``) writes image sets in the layout of ``align.eval.layout``;
``align eval`` (``align.eval.evaluate``) scores them and writes ``align.eval.report``'s files.
"""
