"""Offline training scripts (torch) that produce the weights the runtime ships.

Separate from `advplugin.protectors` so that the runtime never imports a training module
(or, through it, the evaluation harness and torch): protectors load the weights files only,
and the torch they need at inference lives in `advplugin.nets`. Training may import
evaluation (it reuses the harness's data split, crops and decoder training), never the CLI.
"""
