"""Which checkpoint weights get a projector: from adapters' LoRA modules or from ``--targets``.

Contract:

- :func:`weight_for_module` ``(module, names, *, source_label) -> str``: the checkpoint weight
  behind a LoRA module, by name only (:func:`safelora_cli.naming.match_weight`: exact
  ``<module>.weight`` first, else the one name differing only by a model prefix). Patch maps
  modules with this same function, so compute-projections caches exactly the weights patch asks
  for. AdapterError naming the module and ``source_label`` when nothing or several match.
- :func:`resolve_targets` ``(reader, *, adapters=(), targets=None, names=None, config=None)
  -> list[Target]``: the union, in natural order, of the weights behind every LoRA module of
  ``adapters`` (orientation from each adapter's ``fan_in_fan_out``) and the weights chosen by
  ``targets`` (orientation from ``config.json``'s ``model_type``: GPT-2-family Conv1D layers
  are ``[in, out]``). Neither given: UsageError.
- ``--targets`` syntax (:func:`parse_targets`): a regex when it starts with ``re:`` or contains
  a regex metacharacter (``* ? + ^ $ | ( ) [ ] { } \\``), searched (``re.search``) in each
  module path (weight name without ``.weight``); otherwise comma-separated module-name
  suffixes matched at a dot boundary (``q_proj`` and ``self_attn.q_proj`` match
  ``model.layers.0.self_attn.q_proj.weight``). Only 2-D floating-point ``*.weight`` tensors
  are candidates. Nothing matched: UsageError.
- Errors: a LoRA module whose weight is not 2-D, or whose shape disagrees with the adapter's
  ``A``/``B``, raises CheckpointError/AdapterError naming the weight and the file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from safelora_cli.errors import AdapterError, CheckpointError, UsageError
from safelora_cli.naming import layer_suffix, match_weight, natural_sorted

if TYPE_CHECKING:
    from safelora_cli.adapter import Adapter, LoraModule
    from safelora_cli.reader import CheckpointReader

# transformers model types whose linear layers are GPT-2 ``Conv1D`` (weight stored [in, out]).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
# Module names of the Conv1D layers in those models.
CONV1D_MODULES = ("c_attn", "c_proj", "c_fc", "q_attn")
_REGEX_CHARS = set("*?+^$|()[]{}\\")
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True)
class Target:
    """One weight to project: its checkpoint name, orientation and linear dims ``[d_out, d_in]``."""

    weight: str
    fan_in_fan_out: bool
    d_out: int
    d_in: int


def weight_for_module(module: LoraModule, names: Collection[str], *, source_label: str) -> str:
    """The checkpoint weight that LoRA module ``module`` updates (see the module docstring)."""
    hit = match_weight(module.name, names)
    if hit is not None:
        return hit
    want = f"{module.name}.weight"
    suffix = layer_suffix(want)
    several = (
        [n for n in names if n.endswith("." + suffix) or n == suffix] if suffix is not None else []
    )
    if len(several) > 1:
        shown = ", ".join(natural_sorted(several)[:3])
        raise AdapterError(
            f"LoRA module {module.name}: several weights of {source_label} could be its "
            f"weight ({shown})",
            hint="the names are ambiguous; refusing to guess (rename the adapter keys to the "
            "model's exact module paths)",
        )
    raise AdapterError(
        f"LoRA module {module.name}: {source_label} has no weight {want}",
        hint="is the adapter for this model? its module paths must name the model's weights",
    )


def is_regex(spec: str) -> bool:
    """True when ``--targets`` is a regex (``re:`` prefix or a regex metacharacter)."""
    return spec.startswith("re:") or any(c in _REGEX_CHARS for c in spec)


def parse_targets(spec: str) -> Callable[[str], bool]:
    """A predicate over weight names for a ``--targets`` value (see the module docstring)."""
    spec = spec.strip()
    if not spec:
        raise UsageError("--targets is empty", hint="e.g. --targets q_proj,v_proj")
    if is_regex(spec):
        pattern = spec.removeprefix("re:")
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise UsageError(
                f"--targets {spec!r} is not a valid regex ({e})",
                hint="fix the pattern, or give comma-separated module-name suffixes",
            ) from None
        return lambda name: rx.search(name.removesuffix(".weight")) is not None
    items = [s.strip().removesuffix(".weight") for s in spec.split(",")]
    items = [s for s in items if s]
    if not items:
        raise UsageError(f"--targets {spec!r} names no module", hint="e.g. q_proj,v_proj")

    def match(name: str) -> bool:
        mod = name.removesuffix(".weight")
        return any(mod == s or mod.endswith("." + s) for s in items)

    return match


def is_conv1d(weight: str, config: dict[str, Any] | None) -> bool | None:
    """Whether ``weight`` is a GPT-2 ``Conv1D`` weight per ``config``; None when unknown."""
    mod = weight.removesuffix(".weight").rsplit(".", 1)[-1]
    if config is None:
        return None if mod in CONV1D_MODULES else False
    return config.get("model_type") in CONV1D_MODEL_TYPES and mod in CONV1D_MODULES


def names_for(
    names: Sequence[str], *, adapters: Sequence[Adapter] = (), targets: str | None = None
) -> list[str]:
    """The weight names wanted, from names alone (for choosing which Hub shards to fetch)."""
    out: set[str] = set()
    for ad in adapters:
        for m in ad.modules:
            out.add(weight_for_module(m, names, source_label="the base model"))
    if targets is not None:
        pred = parse_targets(targets)
        out.update(n for n in names if n.endswith(".weight") and pred(n))
    return natural_sorted(out)


def _dims(shape: tuple[int, ...], fifo: bool) -> tuple[int, int]:
    return (shape[1], shape[0]) if fifo else (shape[0], shape[1])


def resolve_targets(
    reader: CheckpointReader,
    *,
    adapters: Sequence[Adapter] = (),
    targets: str | None = None,
    names: Iterable[str] | None = None,
    config: dict[str, Any] | None = None,
) -> list[Target]:
    """The weights to project, natural order (see the module docstring).

    ``names``: every tensor name of the checkpoint when the reader lists fewer (a Hub model
    whose unneeded shards were not fetched); default ``reader.names()``. ``config``: the
    checkpoint's ``config.json`` (``SourceSpec.config``), for ``--targets`` orientation.
    """
    if not adapters and targets is None:
        raise UsageError(
            "nothing to compute: give --adapter (one or more) or --targets",
            hint="e.g. --adapter ./my-lora, or --targets q_proj,v_proj",
        )
    all_names = list(names) if names is not None else reader.names()
    name_set = set(all_names)
    where = reader.index_path or (reader.files[0] if len(reader.files) == 1 else reader.root)
    label = f"{reader.label} {where}"
    chosen: dict[str, tuple[bool, str]] = {}  # weight -> (fan_in_fan_out, why)

    for ad in adapters:
        for m in ad.modules:
            try:
                w = weight_for_module(m, name_set, source_label=label)
            except AdapterError as e:
                raise AdapterError(f"adapter {ad.path}: {e.message}", hint=e.hint) from None
            ti = reader.info(w)
            if len(ti.shape) != 2:
                raise CheckpointError(
                    f"{w} in {ti.path} has shape {list(ti.shape)}, not 2-D, but adapter "
                    f"{ad.path} has a LoRA module {m.name} on it",
                    hint="only linear (2-D) weights can be projected; is the adapter for this "
                    "model?",
                    path=ti.path,
                )
            d_out, d_in = _dims(ti.shape, m.fan_in_fan_out)
            if (d_out, d_in) != (m.d_out, m.d_in):
                raise AdapterError(
                    f"adapter {ad.path}: LoRA module {m.name} is [{m.d_out} x {m.d_in}] "
                    f"(fan_in_fan_out={m.fan_in_fan_out}) but {w} in {ti.path} is "
                    f"{list(ti.shape)}",
                    hint="the adapter was trained on a different model (or fan_in_fan_out is "
                    "wrong in adapter_config.json)",
                    path=ad.path,
                )
            prev = chosen.get(w)
            if prev is not None and prev[0] != m.fan_in_fan_out:
                raise AdapterError(
                    f"adapters disagree about the orientation of {w}: {prev[1]} says "
                    f"fan_in_fan_out={prev[0]}, {ad.path} says {m.fan_in_fan_out}",
                    hint="pass adapters of the same model family together",
                    path=ad.path,
                )
            chosen[w] = (m.fan_in_fan_out, str(ad.path))

    if targets is not None:
        pred = parse_targets(targets)
        hits = []
        for n in all_names:
            if not (n.endswith(".weight") and pred(n)):
                continue
            ti = reader.info(n)
            if len(ti.shape) == 2 and ti.dtype in FLOAT_CODES:
                hits.append(n)
        if not hits:
            raise UsageError(
                f"--targets {targets!r} matches no 2-D weight of {label}",
                hint="suffixes match module names at a dot (q_proj,v_proj); a regex (re:...) "
                "is searched in each module path",
            )
        for n in hits:
            if n in chosen:
                continue
            conv = is_conv1d(n, config)
            if conv is None:
                raise UsageError(
                    f"{n} looks like a GPT-2 Conv1D weight but {reader.label} has no "
                    "config.json to tell its orientation",
                    hint="pass the adapter with --adapter (its fan_in_fan_out decides), or add "
                    "the model's config.json",
                )
            chosen[n] = (conv, "--targets")

    out = []
    for w in natural_sorted(chosen):
        fifo = chosen[w][0]
        d_out, d_in = _dims(reader.info(w).shape, fifo)
        out.append(Target(w, fifo, d_out, d_in))
    return out
