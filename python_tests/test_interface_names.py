"""The names docs/INTERFACES.md lists per module (its code blocks are signatures, which test_public_names.py does not
read) and the dotted `eureka_fast.x.y` names the README and docs pages cite in running text all resolve."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# module -> the names its section of docs/INTERFACES.md shows
INTERFACE_NAMES = {
    "eureka_fast.ops": ["route_topk", "moe_plan", "MoEPlan", "permute", "combine", "grouped_mm", "fused_experts",
                        "moe_aux_loss", "stack_norm_project", "backend", "reference"],
    "eureka_fast.audio": ["AudioError", "load_audio", "SAMPLES_PER_TOKEN", "FRAMES_PER_WINDOW", "TOKENS_PER_WINDOW",
                          "PAD_VALUE", "audio_token_count", "log_mel", "eureka_features_batch"],
    "eureka_fast.models.whisper": ["WhisperDims", "WhisperEncoder", "load_whisper_encoder", "load_whisper_model"],
    "eureka_fast.models": ["EurekaAudioConfig", "EurekaAudioForCausalLM", "EurekaAudioProcessor"],
}
DOTTED = re.compile(r"`(eureka_fast(?:\.\w+)+)(?:\([^`]*\))?`")


def _text() -> str:
    return "\n".join(page.read_text(encoding="utf-8") for page in PAGES)


CITED = sorted(set(DOTTED.findall(_text())))


def _needs_transformers(dotted: str) -> None:
    if dotted.startswith(("eureka_fast.models", "eureka_fast.integrations", "eureka_fast.inference")):
        pytest.importorskip("transformers")


def _resolve(dotted: str):
    """The longest importable module prefix of `dotted`, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_the_listed_names_are_on_the_interfaces_page():
    # the list above follows the page: every name it holds is written there
    page = (ROOT / "docs" / "INTERFACES.md").read_text(encoding="utf-8")
    missing = [n for names in INTERFACE_NAMES.values() for n in names if not re.search(rf"\b{n}\b", page)]
    assert not missing
    assert len(CITED) >= 3  # the pattern finds the pages' dotted names


@pytest.mark.parametrize("module,name", [(m, n) for m, names in INTERFACE_NAMES.items() for n in names])
def test_interface_name_resolves(module, name):
    _needs_transformers(module)
    assert hasattr(importlib.import_module(module), name), f"{module}.{name} is missing"


@pytest.mark.parametrize("dotted", CITED)
def test_cited_dotted_name_resolves(dotted):
    if dotted.split(".")[:2] == ["eureka_fast", "_C"]:
        pytest.importorskip("eureka_fast._C", reason="the compiled extension is not built")
    _needs_transformers(dotted)
    _resolve(dotted)
