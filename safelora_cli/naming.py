"""Tensor-name rules shared by every component (DESIGN §2)."""

from __future__ import annotations

import re
from collections.abc import Iterable

_NUM = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders numeric components as numbers: ``layers.9`` before ``layers.10``."""
    return tuple(int(p) if p.isdigit() else p for p in _NUM.split(name))


def natural_sorted(names: Iterable[str]) -> list[str]:
    """``names`` sorted by :func:`natural_key` (deterministic, follows layer index)."""
    return sorted(names, key=natural_key)


_LAYER = re.compile(r"\.(\d+)\.")


def layer_index(module: str) -> int | None:
    """The first numeric path component of ``module`` (its layer), or None."""
    m = _LAYER.search(f".{module}.")
    return int(m.group(1)) if m else None


def layer_suffix(name: str) -> str | None:
    """The part of a dotted name that starts at the component before its first number.

    ``model.language_model.layers.3.mlp.up_proj.weight`` -> ``layers.3.mlp.up_proj.weight``.
    Used to match names that differ only by a model prefix. None when there is no number.
    """
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit() and i > 0:
            return ".".join(parts[i - 1 :])
    return None


def adapter_module_name(key: str) -> str:
    """The base-model module path that a PEFT adapter tensor key belongs to.

    Drops the PEFT wrapper prefix ``base_model.model.`` and everything from the first LoRA
    component (``lora_A``, ``lora_B``, ``lora_embedding_A``, ``lora_magnitude_vector`` ...) on.
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` ->
    ``model.layers.0.self_attn.q_proj``.
    """
    name = key.removeprefix("base_model.model.")
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.startswith("lora_"):
            return ".".join(parts[:i])
    return name.rsplit(".", 1)[0] if "." in name else name


def match_weight(module: str, available: Iterable[str]) -> str | None:
    """The checkpoint weight name that holds module ``module``'s weight, by name only.

    Exact ``<module>.weight`` first. Otherwise names that differ only by a model prefix
    (``model.language_model.layers.0...`` against ``language_model.model.layers.0...``) match
    when exactly one candidate shares the layer suffix (see :func:`layer_suffix`). Returns None
    when nothing or more than one name matches; callers turn that into an error.
    """
    want = f"{module}.weight"
    avail = available if isinstance(available, (set, frozenset, dict)) else set(available)
    if want in avail:
        return want
    suffix = layer_suffix(want)
    if suffix is None:
        return None
    hits = [n for n in avail if n.endswith("." + suffix) or n == suffix]
    return hits[0] if len(hits) == 1 else None
