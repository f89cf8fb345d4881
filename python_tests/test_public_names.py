"""Every eureka_fast name the README and the docs pages show in their code blocks can be imported.

The code blocks are parsed for `from eureka_fast... import ...` and `import eureka_fast...` statements and for
attributes read off `ops.` / `eureka_fast.`; each name is imported or looked up, so a rename or a move that breaks
the documented API fails here (a moved module must keep re-exporting its public names).
"""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```", re.S | re.M)


def code_blocks(markdown: str) -> list[str]:
    """The bodies of the Python code blocks (```python or ```py fences) of a markdown text."""
    return [body for lang, body in FENCE.findall(markdown) if lang.lower() in ("python", "py")]


def _statements(block: str) -> list[ast.stmt]:
    """Top-level import statements of a block. Blocks are examples, not always complete programs, so a block that
    does not parse as a whole is parsed statement by statement (an import spans lines only inside parentheses)."""
    try:
        return list(ast.parse(block).body)
    except SyntaxError:
        pass
    out, pending = [], ""
    for line in block.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        if pending.count("(") > pending.count(")"):
            continue
        try:
            out.extend(ast.parse(pending.strip()).body)
        except SyntaxError:
            pass
        pending = ""
    return out


def documented_names(block: str) -> tuple[set[tuple[str, str]], set[str]]:
    """(module, name) pairs of `from eureka_fast... import name` and `ops.name` / `eureka_fast.name` attribute uses;
    and modules of `import eureka_fast...`."""
    names, modules = set(), set()
    aliases = {}  # local name -> module it stands for
    for node in _statements(block):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "eureka_fast":
            for alias in node.names:
                names.add((node.module, alias.name))
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "eureka_fast":
                    modules.add(alias.name)
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.asname and alias.name or "eureka_fast"
    # attributes read off the package or off `ops` (`ops.route_topk(...)`, `eureka_fast.apply_fast_moe(...)`),
    # outside the import lines themselves
    code = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith(("from ", "import ")))
    for local, module in aliases.items():
        if module in ("eureka_fast", "eureka_fast.ops"):
            for attr in re.findall(rf"(?<![\w.]){re.escape(local)}\.([A-Za-z_]\w*)", code):
                names.add((module, attr))
    return names, modules


def _collect():
    names, modules = set(), set()
    for page in PAGES:
        for block in code_blocks(page.read_text(encoding="utf-8")):
            n, m = documented_names(block)
            names |= {(module, name, page.name) for module, name in n}
            modules |= {(module, page.name) for module in m}
    return sorted(names), sorted(modules)


NAMES, MODULES = _collect()


def test_parser_reads_imports_aliases_and_attributes():
    block = """
import torch
from eureka_fast import ops
from eureka_fast.audio import (load_audio,
                               log_mel as mel)   # a comment
import eureka_fast.integrations.transformers  # registers it
import eureka_fast
weights, ids = ops.route_topk(x, 2)
report = eureka_fast.apply_fast_moe(model)
x.ops.not_ours(); y = torch.ops.eureka_fast.thing
"""
    names, modules = documented_names(block)
    assert names == {("eureka_fast", "ops"), ("eureka_fast.audio", "load_audio"), ("eureka_fast.audio", "log_mel"),
                     ("eureka_fast.ops", "route_topk"), ("eureka_fast", "apply_fast_moe")}
    assert modules == {"eureka_fast.integrations.transformers", "eureka_fast"}
    # an example that is not a whole program still yields its imports
    names, _ = documented_names("from eureka_fast.models import EurekaAudioConfig\nmodel(**inputs  # cut off\n")
    assert names == {("eureka_fast.models", "EurekaAudioConfig")}


def test_markdown_fences_are_found():
    text = "intro\n```python\nfrom eureka_fast import ops\n```\n```bash\nfrom eureka_fast import nope\n```\n"
    assert code_blocks(text) == ["from eureka_fast import ops\n"]


def test_the_pages_document_names():
    """The collection itself works on the real pages (a broken parser must not pass by finding nothing)."""
    found = {(module, name) for module, name, _ in NAMES}
    for expected in [("eureka_fast.audio", "load_audio"), ("eureka_fast.models", "EurekaAudioForCausalLM"),
                     ("eureka_fast.models.whisper", "load_whisper_encoder"), ("eureka_fast.ops", "fused_experts"),
                     ("eureka_fast", "EurekaAudio")]:
        assert expected in found, expected
    assert {m for m, _ in MODULES} >= {"eureka_fast.integrations.transformers"}


@pytest.mark.parametrize("module,name,page", NAMES, ids=[f"{p}:{m}.{n}" for m, n, p in NAMES])
def test_documented_name_imports(module, name, page):
    if module.startswith(("eureka_fast.models", "eureka_fast.integrations")) or name in ("EurekaAudio",
                                                                                         "apply_fast_moe"):
        pytest.importorskip("transformers")
    mod = importlib.import_module(module)
    try:
        getattr(mod, name)
    except AttributeError:
        # `from package import submodule` also works for submodules that are not attributes yet
        importlib.import_module(f"{module}.{name}")


@pytest.mark.parametrize("module,page", MODULES, ids=[f"{p}:{m}" for m, p in MODULES])
def test_documented_module_imports(module, page):
    if module.startswith("eureka_fast.integrations"):
        pytest.importorskip("transformers")
    importlib.import_module(module)
