"""Fixtures of the serving tests (a small random model saved to a directory, loaded once per session)."""
import pytest

from serve_helpers import build_model


@pytest.fixture(scope="session")
def serve_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve_model")
    model, processor = build_model()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def model_and_processor(serve_model_dir):
    from eureka_fast.inference import EurekaAudio

    loaded = EurekaAudio(serve_model_dir)
    return loaded.model, loaded.processor
