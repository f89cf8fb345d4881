"""The repository stands on its own: nothing in it cites the private design notes that live outside it (their facts
are written into docs/), so a reader of any file can follow every reference inside the checkout."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("eureka_fast", "csrc", "bench", "python_tests", "docs", ".ci")
SUFFIXES = (".py", ".cpp", ".cu", ".cuh", ".h", ".sh", ".md", ".yaml", ".toml", ".txt")
OUTSIDE_NOTES = re.compile(r"\b(SPEC|KERNELS)\.md\b")


def scanned_files():
    yield os.path.join(ROOT, "README.md")
    for top in SCANNED:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                path = os.path.join(dirpath, name)
                if name.endswith(SUFFIXES) and path != os.path.abspath(__file__):
                    yield path


def test_no_file_cites_notes_outside_the_repository():
    files = list(scanned_files())
    assert len(files) > 100  # the walk found the tree
    citing = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                if OUTSIDE_NOTES.search(line):
                    citing.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not citing, "cite the project's docs/ pages instead:\n" + "\n".join(citing)


def test_the_check_finds_a_citation(tmp_path):
    assert OUTSIDE_NOTES.search("# see SPEC.md section 3") and OUTSIDE_NOTES.search("(KERNELS.md: targets)")
    assert not OUTSIDE_NOTES.search("docs/model.md")
