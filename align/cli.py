"""The ``align`` console script.

``align fit|validate --config a.yaml --config b.yaml ...`` is LightningCLI (omegaconf
parser mode, so configs may interpolate); ``align data|sample|eval|bench ...`` are tool commands
discovered in ``align.commands``.
"""

from __future__ import annotations

import sys

from align.commands import discover, dispatch


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: align {fit,validate} --config CONFIG [--config ...] "
            "[--key.path VALUE ...]\n"
            "       align <tool command> [args]\n\n"
            "training (LightningCLI; `align fit --help` for every option):\n"
            "  fit / validate\n"
        )
        return dispatch("align.commands", ["--help"], prog="align") if argv else 2
    if argv[0] in discover("align.commands"):
        return dispatch("align.commands", argv, prog="align")
    from align.lightning_cli import run_lightning_cli

    run_lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
