"""Fixtures of the command-line tests (helpers live in cli_helpers.py)."""
from __future__ import annotations

import pytest
import yaml

from cli_helpers import OFFLINE_CONFIG, write_tone


@pytest.fixture
def offline_config(tmp_path):
    path = tmp_path / "offline.yaml"
    path.write_text(yaml.safe_dump(OFFLINE_CONFIG))
    return str(path)


@pytest.fixture(scope="session")
def tone_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tones")
    for i in range(3):
        write_tone(d / f"t{i}.wav", 1.0 + 0.3 * i, 150 + 40 * i)
    return d
