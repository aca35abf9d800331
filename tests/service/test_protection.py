"""What protects the served gallery, built from Settings without starting HTTP: template
mode reads the scheme's metadata and scorer without a key; start-up refuses a gallery made
with another configuration of the scheme. (Over HTTP: test_recognition, test_rotation.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from advplugin.gallery import Gallery
from advplugin.keys import write_key
from advplugin.protectors import create_protector, scheme_info
from advplugin.protectors.xnn import XNNProtector
from advplugin.service.protection import ConfigurationError, Protection
from advplugin.service.state import ServiceState
from advplugin.settings import Settings


def test_template_mode_uses_the_schemes_keyless_metadata_and_scorer(tmp_path: Path, monkeypatch) -> None:
    def own_scorer(cls: type, dim: int, config: object):  # a scheme whose matcher is not cosine
        return lambda probes, gallery: np.full((len(probes), len(gallery)), 0.25, np.float32)

    monkeypatch.setattr(XNNProtector, "scorer", classmethod(own_scorer))
    s = Settings(data_dir=tmp_path, mode="templates", scheme="xnn", template_key_id="k" * 16)
    p = Protection.from_settings(s)
    assert p.protector is None and p.extractor is None  # no key, no extractor
    assert p.expected.key_id == "k" * 16 and p.expected.scheme_version == scheme_info("xnn").version
    assert p.expected.config_digest == scheme_info("xnn").config_digest(128)
    assert p.scorer(np.ones((2, 128), np.float32), np.ones((3, 128), np.float32)).tolist() == [[0.25] * 3] * 2


def test_template_mode_refuses_a_dimension_without_weights(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, mode="templates", scheme="advface", template_key_id="x", template_dim=64)
    with pytest.raises(ConfigurationError, match="dimensions"):
        Protection.from_settings(s)


def test_start_refuses_templates_of_another_configuration(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key = write_key(key_file)
    url = f"sqlite:///{tmp_path / 'gallery.db'}"
    gaussian = create_protector("xnn", key=key, dim=128, matrix="gaussian")
    with Gallery.open(url, upgrade=True) as gallery:
        raw = np.random.default_rng(0).normal(size=(3, 128)).astype(np.float32)
        gallery.add_templates(
            ["a", "b", "c"], gaussian.protect(raw), protection=gaussian.metadata,
            extractor_name="dlib", extractor_version="x",
        )  # fmt: skip
    s = Settings(data_dir=tmp_path / "data", database_url=url, key_file=key_file, scheme="xnn")
    with pytest.raises(ConfigurationError, match=gaussian.metadata.config_digest):
        ServiceState.start(s)
