"""Fixtures shared by test modules in several folders."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that run many small ops (loop references, tiny models), which intra-op threads only slow down,
    badly so when the cores are shared: one thread keeps them fast. Use with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _espeak_stand_in():
    """Tests speak with `espeak-ng`. Without that program (or with EUREKA_TEST_ESPEAK=wheel) a stand-in over the
    espeak-ng library of the espeakng-loader wheel (the test extra) goes first on PATH, one process per utterance
    like the program, so the tests need no system package."""
    import atexit
    import os
    import shutil
    import sys
    import tempfile

    if shutil.which("espeak-ng") and os.environ.get("EUREKA_TEST_ESPEAK") != "wheel":
        return
    from eureka_fast.dataflux.espeak import library_available

    if not library_available():
        return
    bin_dir = tempfile.mkdtemp(prefix="eureka-espeak-")
    atexit.register(shutil.rmtree, bin_dir, True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(bin_dir, "espeak-ng")
    with open(script, "w", encoding="utf-8") as fh:
        fh.write(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {root!r})\n"
                 "from eureka_fast.dataflux.espeak import main\nsys.exit(main())\n")
    os.chmod(script, 0o755)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    os.environ["EUREKA_ESPEAK_STAND_IN"] = "1"  # for the few tests tied to the program's exact audio


_espeak_stand_in()
