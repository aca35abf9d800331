"""One exception hierarchy: `AdvpluginError` and the few kinds below it.

Why one base: whoever drives advplugin (the `advplugin` command, an application embedding the
gallery or the HTTP client) has one thing to catch for "advplugin refused or failed, and said
why", apart from bugs, which should keep their tracebacks. `advplugin.cli.main` catches it
once and maps each kind to an exit code (listed in `advplugin --help`).

Why the messages may be printed as they are: an advplugin error's message is written for an
operator. It names settings, files, key ids, counts and what to run; it never echoes a vector,
a template, a key's or an API key's bytes, nor an image's content. So it can go to a terminal
or a log line as it is, without a traceback (whose frames could show more).

Each kind also derives from the builtin exception its members were before (`ValueError` for
invalid input, `LookupError` for not found, `RuntimeError` for the rest), so `except
ValueError` and the like keep working; a class names at most two bases (a domain class: its
kind, and where callers rely on it a narrower builtin, as `SubjectNotFound(NotFoundError,
KeyError)`).

This module imports nothing and sits in the lowest layer of the import contracts
(`.importlinter`), below even the HTTP client, so that every layer may derive from it.
"""

from __future__ import annotations

__all__ = [
    "AdvpluginError",
    "ConfigurationError",
    "InvalidInputError",
    "KeyMaterialError",
    "NotFoundError",
    "RemoteError",
]


class AdvpluginError(Exception):
    """Base of every exception advplugin defines; its message is safe to print (no biometric
    data, no secret)."""


class InvalidInputError(AdvpluginError, ValueError):
    """An input that cannot be used: an image, a model file, a ciphertext or a message that is
    malformed or over a limit, a write that cannot apply. The message says what was wrong,
    never the content."""


class NotFoundError(AdvpluginError, LookupError):
    """Something named (a subject, a collection, an API key) does not exist."""


class ConfigurationError(AdvpluginError, RuntimeError):
    """advplugin cannot run with this configuration: settings, a key or a store missing where
    it should be, a database at an older schema, a gallery this service cannot match. The
    message says what to set or run."""


class KeyMaterialError(AdvpluginError, RuntimeError):
    """Sealed storage (`advplugin.gallery.sealing`): sealed data that fails authentication
    (tampered, under another key, or its subject erased). A master key that is missing,
    unreadable or not the right one (`MasterKeyError`) is also a `ConfigurationError`: the
    operator fixes it in the settings."""


class RemoteError(AdvpluginError, RuntimeError):
    """The advplugin service answered with an error (or, for a client, could not be
    reached)."""
