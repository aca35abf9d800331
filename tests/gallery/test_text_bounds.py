"""Defence in depth: the gallery itself refuses strings that PostgreSQL cannot store (NUL,
longer than the column) or that would grow every row without bound, before any SQL, on both
databases alike; a lookup by such a name is simply "not found" (PostgreSQL would raise)."""

from __future__ import annotations

import numpy as np
import pytest

from advplugin.gallery import Gallery, SubjectNotFound
from advplugin.protectors import create_protector


def test_unstorable_strings_are_refused_before_sql(gallery: Gallery, key) -> None:
    protector = create_protector("xnn", key=key, dim=128)
    t = protector.protect(np.random.default_rng(0).normal(size=(1, 128)).astype(np.float32))

    def add(subject: str = "ok", version: str = "v", name: str = "dlib") -> list[int]:
        return gallery.add_templates([subject], t, protection=protector.metadata,
                                     extractor_name=name, extractor_version=version)

    for kwargs in ({"subject": "a\x00b"}, {"subject": "s" * 256}, {"subject": "  "},
                   {"subject": "\ud800"}, {"version": "v" * 129}, {"version": "v\x00"},
                   {"version": "v" * 100_000}, {"name": "n" * 129}):
        with pytest.raises(ValueError, match=r"at most|Unicode"):
            add(**kwargs)
    assert gallery.count_templates() == 0 and gallery.last_change_seq() == 0
    assert add(subject="s" * 255, version="v" * 128)  # at the limits: stored on both
    for name in ("a\x00b", "s" * 256, "\ud800"):
        with pytest.raises(SubjectNotFound):
            gallery.get_subject(name)
        with pytest.raises(SubjectNotFound):
            gallery.delete_subject(name)
    assert gallery.get_subject("s" * 255).template_count == 1
