"""`advplugin train SCHEME ...`: train a learned scheme's weights (torch, CPU).

A thin entry point: the trainers live in `advplugin.training` (the only place besides
`advplugin.nets` that imports torch) and keep their own options, so `advplugin train xnn-d
--help` shows exactly what `python -m advplugin.training.xnnd --help` shows.
"""

from __future__ import annotations

import argparse
import importlib

#: Scheme name -> the trainer module whose `main(argv)` trains it.
TRAINERS = {"advface": "advplugin.training.advface", "xnn-d": "advplugin.training.xnnd"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a learned scheme's weights (advface, xnn-d)",
        description="Runs a scheme's trainer; every option after the scheme name is the "
        "trainer's own (`advplugin train xnn-d --help`). See docs/schemes/.",
        add_help=True,
    )
    p.add_argument("scheme", choices=sorted(TRAINERS), help="the scheme to train")
    p.add_argument("options", nargs=argparse.REMAINDER, help="the trainer's options")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    trainer = importlib.import_module(TRAINERS[args.scheme])
    return int(trainer.main(args.options) or 0)
