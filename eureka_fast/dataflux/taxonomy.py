"""The category taxonomy (L0 > L1 > L2 > L3) loaded from YAML into flat leaf categories."""
from __future__ import annotations

import dataclasses
import os

import yaml

DEFAULT_TAXONOMY = os.path.join(os.path.dirname(__file__), "taxonomy.yaml")
KINDS = ("class", "duration", "word")


class TaxonomyError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Category:
    id: str
    path: tuple  # (L0, L1, L2, L3)
    task: str
    kind: str
    fact: str
    requires: str | None
    templates: tuple
    values: dict  # value -> tuple of option phrasings (class kind)
    distractors: tuple
    distractor_words: tuple
    examples: tuple

    @property
    def path_str(self) -> str:
        return " > ".join(self.path)

    def option_value(self, option_text: str):
        """The fact value an option's text stands for (class kind), or None for a distractor / unknown text."""
        norm = option_text.strip().rstrip(".").lower()
        for value, phrasings in self.values.items():
            if any(norm == p.strip().rstrip(".").lower() for p in phrasings):
                return value
        return None


def load_taxonomy(path: str | None = None) -> list[Category]:
    path = path or DEFAULT_TAXONOMY
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise TaxonomyError(f"{path}: cannot read taxonomy ({exc})") from exc
    tree = (doc or {}).get("taxonomy")
    if not isinstance(tree, dict) or not tree:
        raise TaxonomyError(f"{path}: expected a top-level 'taxonomy:' mapping of L0 categories")
    leaves: list[Category] = []

    def walk(node, trail):
        if not isinstance(node, dict):
            raise TaxonomyError(f"{path}: {' > '.join(trail)} must be a mapping")
        if "id" in node:  # a leaf spec
            if len(trail) != 4:
                raise TaxonomyError(f"{path}: leaf {' > '.join(trail)} is at level L{len(trail) - 1}, expected L3")
            leaves.append(_leaf(node, tuple(trail), path))
            return
        for name, child in node.items():
            if len(trail) >= 4:
                raise TaxonomyError(f"{path}: {' > '.join(trail)} is deeper than L3")
            walk(child, trail + [str(name)])

    walk(tree, [])
    ids = [c.id for c in leaves]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise TaxonomyError(f"{path}: duplicate category ids {sorted(dup)}")
    return leaves


def _leaf(spec: dict, trail: tuple, path: str) -> Category:
    where = f"{path}: {' > '.join(trail)}"
    kind = spec.get("kind")
    if kind not in KINDS:
        raise TaxonomyError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    templates = tuple(spec.get("templates") or ())
    if len(set(templates)) < 5:
        raise TaxonomyError(f"{where}: needs at least 5 distinct templates, has {len(set(templates))}")
    values = {str(k): tuple(v) for k, v in (spec.get("values") or {}).items()}
    if kind == "class" and len(values) < 2:
        raise TaxonomyError(f"{where}: a class category needs at least 2 values")
    distractors = tuple(spec.get("distractors") or ())
    if kind == "class" and len(values) + len(distractors) < 4:
        raise TaxonomyError(f"{where}: values + distractors must give at least 4 options")
    words = tuple(spec.get("distractor_words") or ())
    if kind == "word" and len(words) < 3:
        raise TaxonomyError(f"{where}: a word category needs at least 3 distractor_words")
    if not spec.get("fact"):
        raise TaxonomyError(f"{where}: missing 'fact'")
    return Category(id=str(spec["id"]), path=trail, task=str(spec.get("task", "qa")), kind=kind,
                    fact=str(spec["fact"]), requires=spec.get("requires"), templates=templates, values=values,
                    distractors=distractors, distractor_words=words, examples=tuple(spec.get("examples") or ()))
