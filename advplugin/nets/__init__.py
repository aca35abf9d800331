"""Torch network definitions and inference, no training loops.

This is the only place below `advplugin.training` and `advplugin.evaluation` where torch
code lives. Runtime packages (protectors, adapters, gallery, service) may use it, but only
through function-local imports, so that importing them never imports torch (the service
starts in well under a second and `xnn` deployments do not pay torch's import time or
memory). It imports only torch, numpy and advplugin's foundation modules (keys, registry,
images, embedding_files), never protectors or anything above them.
"""
