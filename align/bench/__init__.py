"""Benchmarks of training steps: FLOPs (``flops``), memory (``memory``), timing (``runner``), one
step built from the real modules (``step``) and the table/JSON report
(``report``). Entry point: ``align bench``."""
