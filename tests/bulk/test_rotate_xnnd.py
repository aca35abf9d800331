"""`xnn-d` galleries re-key without raw embeddings (`advplugin rotate-key`): the key acts
last and is orthogonal, so the stored templates become exactly the new key's templates and
the old key's probes stop matching."""

from __future__ import annotations

import numpy as np

from advplugin.bulk import rotate_key
from advplugin.gallery import Gallery
from advplugin.keys import load_key
from advplugin.protectors import create_protector


def test_xnnd_gallery_rotates_to_the_new_keys_templates(lfw_rows, database_url, key_files) -> None:
    k1, k2 = load_key(key_files[0]), load_key(key_files[1])
    p1, p2 = (create_protector("xnn-d", key=k, dim=128) for k in (k1, k2))
    raw = lfw_rows.vectors[:300]
    gallery = Gallery.open(database_url("sqlite", "gallery"), upgrade=True)
    try:
        gallery.add_templates(
            list(lfw_rows.subjects[:300]), p1.protect(raw), protection=p1.metadata,
            extractor_name="dlib", extractor_version="test",
        )  # fmt: skip
        result = rotate_key(gallery, k1, k2)
        assert result.rotated == 300
        assert gallery.count_templates(key_id=k2.key_id) == 300
        stored = np.concatenate([b.vectors for b in gallery.iter_templates(key_id=k2.key_id)])
        np.testing.assert_allclose(stored, p2.protect(raw), atol=1e-4)
        # A probe protected under the retired key no longer finds its own template.
        s = p2.score(p1.protect(raw[:50]), stored)
        assert np.mean(np.argmax(s, axis=1) == np.arange(50)) < 0.1
    finally:
        gallery.close()


def test_a_release_1_gallery_rotates_and_is_served_with_its_options(
    lfw_rows, database_url, key_files, tmp_path
) -> None:
    """Galleries made by an earlier release of the trained scheme keep working: the options
    say which release (`rotate-key --option release=1`, ADVPLUGIN_SCHEME_OPTIONS)."""
    import pytest

    from advplugin.service.protection import ConfigurationError, Protection
    from advplugin.service.startup import check_gallery_matches
    from advplugin.settings import Settings

    k1, k2 = load_key(key_files[0]), load_key(key_files[1])
    old = create_protector("xnn-d", key=k1, dim=128, release=1)
    assert old.metadata.config_digest != create_protector("xnn-d", key=k1, dim=128).metadata.config_digest
    raw = lfw_rows.vectors[:40]
    gallery = Gallery.open(database_url("sqlite", "gallery"), upgrade=True)
    try:
        gallery.add_templates(list(lfw_rows.subjects[:40]), old.protect(raw), protection=old.metadata,
                              extractor_name="dlib", extractor_version="test")
        base = {"mode": "templates", "scheme": "xnn-d", "template_key_id": k1.key_id, "data_dir": tmp_path}
        with pytest.raises(ConfigurationError, match="ADVPLUGIN_SCHEME_OPTIONS"):
            check_gallery_matches(gallery, Protection.from_settings(Settings(**base)), Settings(**base))
        settings = Settings(**base, scheme_options={"release": 1})
        check_gallery_matches(gallery, Protection.from_settings(settings), settings)  # served as it is
        with pytest.raises(ValueError, match="--option"):
            rotate_key(gallery, k1, k2)
        assert rotate_key(gallery, k1, k2, options={"release": 1}).rotated == 40
        stored = np.concatenate([b.vectors for b in gallery.iter_templates(key_id=k2.key_id)])
        new = create_protector("xnn-d", key=k2, dim=128, release=1)
        np.testing.assert_allclose(stored, new.protect(raw), atol=1e-4)
    finally:
        gallery.close()
