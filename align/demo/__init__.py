"""A small world in which the truth is known: procedurally rendered shapes, captions that describe
them, and a programmatic judge that reads an image back and counts the caption's facts it satisfies.

``align demo`` builds the world, trains (or reuses) a deliberately imperfect base model on it, makes
on-policy preference data with the judge, runs every method's ``configs/demo`` config through
``align fit`` and evaluates every model with the judge on held-out captions (``align.demo.run``).
"""
