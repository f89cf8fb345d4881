"""End-to-end recipes. `eureka-audio recipe nano` (nano.py) trains a small Eureka-Audio from synthetic speech on one
CPU: corpus (corpus.py) -> DataFlux -> manifests (manifests.py) -> align / joint / sft with the bundled configs
(nano/*.yaml) -> evaluation -> report (report.py). docs/recipe.md describes the steps and their files.
"""

__all__ = ["run_nano", "write_aggregate"]


def __getattr__(name):
    if name == "run_nano":
        from .nano import run_nano

        return run_nano
    if name == "write_aggregate":
        from .report import write_aggregate

        return write_aggregate
    raise AttributeError(f"module 'eureka_fast.recipe' has no attribute {name!r}")
