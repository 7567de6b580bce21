"""PEFT LoRA adapter directory -> typed LoRA modules (DESIGN §2).

:func:`load_adapter` resolves a local path or Hub id (``sources.resolve_adapter``), reads
``adapter_config.json`` and the weights (``adapter_model.safetensors`` through the lazy
:class:`~safelora_cli.reader.CheckpointReader`; a legacy ``adapter_model.bin`` only with
``torch.load(weights_only=True)``), and returns an :class:`Adapter`:

- ``modules``: every ``lora_A``/``lora_B`` pair, matched by name (never by position), as a
  :class:`LoraModule` named by its base-model module path, in natural order. ``A`` is
  ``[r, d_in]`` and ``B`` is ``[d_out, r]`` in linear orientation whatever the base layer;
  ``fan_in_fan_out`` says the *base* weight is stored ``[in, out]`` (GPT-2 ``Conv1D``).
- ``skipped``: what is carried over unchanged and why: DoRA modules (``lora_magnitude_vector``
  or ``use_dora``), embedding LoRA (``lora_embedding_A/B``), convolution LoRA (A/B not 2-D),
  ``modules_to_save`` copies, full base-layer copies (``base_layer.*``, PEFT's
  ``save_embedding_layers``) and any other non-LoRA tensor.

Scale per module: ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``, where ``r`` and
``alpha`` come from ``rank_pattern`` / ``alpha_pattern`` resolved exactly as PEFT's
``get_pattern_key`` does (first key ``k``, in config order, with
``re.match(rf"(.*\\.)?({k})$", module)``), else from ``r`` / ``lora_alpha`` (PEFT's defaults 8
and 8 when absent).

Refused with :class:`AdapterError` (nothing guessed): missing or broken config, a ``peft_type``
other than LORA, no weights file, a ``lora_A`` without its ``lora_B`` (or the reverse), several
adapters in one file, ranks that disagree (A rows, B columns, the config's ``r``/``rank_pattern``),
malformed LoRA tensors, ``layer_replication`` / ``target_parameters`` adapters (their tensors do
not name base-model weights one to one), and an adapter with no LoRA tensor at all.
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from safelora_cli.errors import AdapterError
from safelora_cli.naming import natural_key, natural_sorted

if TYPE_CHECKING:
    import torch

    from safelora_cli.reader import CheckpointReader
    from safelora_cli.sources import SourceSpec

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# PEFT's LoraConfig defaults, used when the config omits the field.
DEFAULT_R = 8
DEFAULT_ALPHA = 8

REASON_DORA = (
    "DoRA module (lora_magnitude_vector): Safe LoRA's projection of B is not defined under "
    "DoRA's weight renormalisation"
)
REASON_EMBEDDING = "embedding LoRA (lora_embedding_A/B): not a linear layer's weight update"
REASON_CONV = "convolution LoRA ({ndim}-D lora_A/lora_B): not a linear layer's weight update"
REASON_MODULES_TO_SAVE = "modules_to_save: a full trained copy of the module, not a LoRA update"
REASON_BASE_LAYER = "full copy of the base layer (PEFT save_embedding_layers), not a LoRA update"
REASON_OTHER = "not a LoRA tensor ({what})"
REASON_UNKNOWN_LORA = "unrecognised LoRA tensor {part!r}"
REASON_REPLACED = "the adapter also stores a full weight for this module ({what})"
NOTE_BIAS = "lora_B.bias carried over unchanged"
NOTE_EXTRA = "{what} carried over unchanged"

# Model families whose attention/MLP layers are transformers' Conv1D (weight stored [in, out]),
# and the Conv1D layer names in them (from transformers' modeling code).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
CONV1D_LEAVES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})

_A_PARTS = ("lora_A",)
_B_PARTS = ("lora_B",)
_DORA_PART = "lora_magnitude_vector"
_EMB_PARTS = ("lora_embedding_A", "lora_embedding_B")
# Components that mark a full copy of (part of) the base model rather than a LoRA tensor.
_COPY_PARTS = ("modules_to_save", "original_module", "base_layer")


@dataclass(frozen=True)
class LoraModule:
    """One projectable LoRA pair: ``dW = scale * B @ A`` for base weight ``f"{name}.weight"``.

    ``A`` (``key_a``) is ``[rank, d_in]``, ``B`` (``key_b``) is ``[d_out, rank]``, both in linear
    orientation; ``fan_in_fan_out`` means the base weight is stored ``[d_in, d_out]``
    (transpose it, not A/B). ``dtype`` is lora_B's safetensors dtype code.
    """

    name: str
    key_a: str
    key_b: str
    rank: int
    alpha: float
    scale: float
    fan_in_fan_out: bool
    d_out: int
    d_in: int
    dtype: str
    note: str | None = None

    @property
    def weight_name(self) -> str:
        """The base-model weight this module updates."""
        return f"{self.name}.weight"


@dataclass(frozen=True)
class SkippedModule:
    """Adapter tensors that are carried over unchanged, never projected, and why."""

    name: str
    keys: tuple[str, ...]
    reason: str


class _BinTensors:
    """The tensors of a legacy ``adapter_model.bin`` (loaded once, weights_only)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def names(self) -> list[str]:
        return natural_sorted(self.tensors)


@dataclass
class Adapter:
    """A PEFT LoRA adapter: its config, weights file and typed modules.

    ``reader`` is the lazy reader of ``adapter_model.safetensors`` (None for a legacy ``.bin``,
    whose tensors are held in memory). ``source`` is None when built by :func:`read_adapter`
    without provenance.
    """

    path: Path
    source: SourceSpec | None
    config: dict
    weights_path: Path
    modules: list[LoraModule]
    skipped: list[SkippedModule]
    reader: CheckpointReader | None = None
    _bin: _BinTensors | None = field(default=None, repr=False)

    @property
    def is_legacy_bin(self) -> bool:
        """True when the weights come from a pickled ``adapter_model.bin``."""
        return self._bin is not None

    def tensor_names(self) -> list[str]:
        """Every tensor key of the weights file, natural order."""
        if self._bin is not None:
            return self._bin.names()
        assert self.reader is not None
        return self.reader.names()

    def shape(self, key: str) -> tuple[int, ...]:
        """Stored shape of tensor ``key``."""
        if self._bin is not None:
            return tuple(self._get_bin(key).shape)
        assert self.reader is not None
        return tuple(self.reader.info(key).shape)

    def dtype(self, key: str) -> str:
        """Safetensors dtype code (``"F32"``, ``"BF16"`` ...) of tensor ``key``."""
        if self._bin is not None:
            from safelora_cli.reader import dtype_code

            return dtype_code(self._get_bin(key).dtype)
        assert self.reader is not None
        return self.reader.info(key).dtype

    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` of the weights file (``{}`` for a legacy .bin)."""
        if self._bin is not None:
            return {}
        assert self.reader is not None
        return self.reader.metadata()

    def _get_bin(self, key: str) -> torch.Tensor:
        assert self._bin is not None
        t = self._bin.tensors.get(key)
        if t is None:
            raise AdapterError(
                f"adapter: tensor {key!r} not found in {self.weights_path}",
                hint="check that the adapter is the one you meant",
                path=self.weights_path,
            )
        return t

    def load(self, key: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``key`` on CPU, stored shape, cast to ``dtype`` if given (a fresh tensor)."""
        if self._bin is not None:
            t = self._get_bin(key)
            return t.clone() if dtype is None or dtype == t.dtype else t.to(dtype)
        assert self.reader is not None
        return self.reader.load(key, dtype=dtype)

    def load_a(self, m: LoraModule, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """lora_A of ``m``: ``[rank, d_in]``; AdapterError if it holds NaN or Inf."""
        return self._finite(m.key_a, self.load(m.key_a, dtype=dtype))

    def load_b(self, m: LoraModule, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """lora_B of ``m``: ``[d_out, rank]``; AdapterError if it holds NaN or Inf."""
        return self._finite(m.key_b, self.load(m.key_b, dtype=dtype))

    def _finite(self, key: str, t: torch.Tensor) -> torch.Tensor:
        # A diverged or corrupt LoRA factor has no cosine and no meaningful projection.
        import torch

        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterError(
                f"adapter: {self.weights_path}: {key} contains NaN or Inf",
                hint="the training diverged or the file is corrupt; retrain or re-save the adapter",
                path=self.weights_path,
            )
        return t

    def close(self) -> None:
        """Close the weights file (the adapter can no longer load tensors)."""
        if self.reader is not None:
            self.reader.close()

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- config


# A key made only of these characters has no quantifier, group, class or alternation: matching
# it (behind PEFT's ``(.*\.)?`` prefix) is linear in the module name, so it runs in-process.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.\-^$]*")
REGEX_TIMEOUT_S = 10.0
# Any other key runs in a child interpreter with a deadline: Python's re cannot be interrupted,
# and a key such as "(a+)+$" backtracks exponentially on a long module name.
_MATCH_CHILD = (
    "import json, re, sys\n"
    "d = json.load(sys.stdin)\n"
    "out = []\n"
    "for m in d['modules']:\n"
    "    out.append(next((i for i, k in enumerate(d['keys'])\n"
    "                     if re.match('(.*\\\\.)?(' + k + ')$', m)), -1))\n"
    "json.dump(out, sys.stdout)\n"
)


def _regex_timeout() -> float:
    import os

    try:
        t = float(os.environ.get("SAFELORA_REGEX_TIMEOUT", REGEX_TIMEOUT_S))
    except ValueError:
        return REGEX_TIMEOUT_S
    return t if t > 0 and math.isfinite(t) else REGEX_TIMEOUT_S


def _peft_match(key: str, module: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", module) is not None


def match_pattern_keys(
    pattern_keys: Iterable[str], modules: Iterable[str], *, what: str = "pattern", where: str = ""
) -> dict[str, str | None]:
    """Each module's first matching pattern key, as PEFT's ``get_pattern_key`` matches it.

    A key matches when ``re.match(rf"(.*\\.)?({key})$", module)`` does (the key is a regex
    for a whole dotted suffix of the module path). Plain keys (letters, digits, ``_ . - ^ $``)
    match in-process; any other key is matched by a child Python (the same ``re`` engine, so
    the same semantics) that must finish within ``SAFELORA_REGEX_TIMEOUT`` seconds (default
    10): a key that backtracks catastrophically is an AdapterError naming it, not a hang.
    """
    keys = list(pattern_keys)
    names = list(dict.fromkeys(modules))
    if not keys or not names:
        return dict.fromkeys(names)
    if all(_PLAIN_KEY.fullmatch(k) for k in keys):
        return {m: next((k for k in keys if _peft_match(k, m)), None) for m in names}
    timeout = _regex_timeout()
    found = _match_in_child(tuple(keys), tuple(names), timeout)
    hint = (
        f"simplify the {what} keys in adapter_config.json (a key is a regex matched against "
        "each module name; nested quantifiers such as (a+)+ take exponential time)"
    )
    if found is None:
        slow = [k for k in keys if not _PLAIN_KEY.fullmatch(k)]
        shown = ", ".join(repr(k[:60]) for k in slow[:3])
        raise AdapterError(
            f"adapter: {where}: matching the {what} keys {shown} against the module names "
            f"took more than {timeout:g} s",
            hint=hint,
            path=where or None,
        )
    if isinstance(found, str):
        raise AdapterError(
            f"adapter: {where}: the {what} keys could not be matched ({found})",
            hint=hint,
            path=where or None,
        )
    return {m: (keys[i] if 0 <= i < len(keys) else None) for m, i in zip(names, found, strict=True)}


@functools.lru_cache(maxsize=64)
def _match_in_child(
    keys: tuple[str, ...], names: tuple[str, ...], timeout: float
) -> tuple[int, ...] | str | None:
    """Index of each name's first matching key (-1: none), computed by a child interpreter;
    None when it ran out of time, a string saying why it failed otherwise.

    Cached: a batch of adapters from one recipe shares config and module names, so a fleet
    pays for one child (or one timeout), not one per adapter.
    """
    import subprocess
    import sys

    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _MATCH_CHILD],
            input=json.dumps({"keys": keys, "modules": names}),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    try:
        found = json.loads(done.stdout) if done.returncode == 0 else None
    except ValueError:
        found = None
    if not isinstance(found, list) or len(found) != len(names):
        return (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
    return tuple(i if isinstance(i, int) and not isinstance(i, bool) else -1 for i in found)


def pattern_key(pattern_keys: Iterable[str], module: str) -> str | None:
    """The first pattern key matching ``module`` exactly as PEFT's ``get_pattern_key`` does
    (see :func:`match_pattern_keys`; the same bounded matching). None when no key matches."""
    return match_pattern_keys(pattern_keys, [module])[module]


def resolve_all(
    config: dict, modules: Iterable[str], *, where: str = ""
) -> dict[str, tuple[int, float]]:
    """``{module: (r, alpha)}`` after ``rank_pattern`` / ``alpha_pattern`` (as PEFT does), with
    each pattern matched once for all modules (one bounded child process at most per pattern)."""
    names = list(dict.fromkeys(modules))
    r = config.get("r", DEFAULT_R)
    alpha = config.get("lora_alpha", DEFAULT_ALPHA)
    rp = config.get("rank_pattern") or {}
    ap = config.get("alpha_pattern") or {}
    rk = match_pattern_keys(rp, names, what="rank_pattern", where=where)
    ak = match_pattern_keys(ap, names, what="alpha_pattern", where=where)
    # PEFT falls back to looking the module name itself up when no key matches.
    return {
        m: (
            rp.get(rk[m] if rk[m] is not None else m, r),
            ap.get(ak[m] if ak[m] is not None else m, alpha),
        )
        for m in names
    }


def resolve_rank_alpha(config: dict, module: str) -> tuple[int, float]:
    """``(r, alpha)`` of ``module`` after ``rank_pattern`` / ``alpha_pattern`` (as PEFT does)."""
    return resolve_all(config, [module])[module]


def lora_scale(alpha: float, r: int, *, use_rslora: bool) -> float:
    """PEFT's scaling: ``alpha / sqrt(r)`` with rsLoRA, else ``alpha / r``."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _finite_number(x: object) -> bool:
    """A JSON number usable as a float (not a bool; ints beyond float range are not)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _config_error(path: Path, what: str, hint: str) -> AdapterError:
    return AdapterError(f"adapter: {path}: {what}", hint=hint, path=path)


def read_config(directory: Path) -> dict:
    """``adapter_config.json`` of ``directory``, checked to be a usable LoRA config."""
    p = directory / CONFIG_NAME
    _refuse_special(p)
    if not p.is_file():
        raise AdapterError(
            f"adapter: no {CONFIG_NAME} in {directory}",
            hint="pass a PEFT adapter directory (as written by save_pretrained)",
            path=directory,
        )
    from safelora_cli.fsio import read_regular
    from safelora_cli.reader import MAX_JSON_BYTES

    try:
        size = p.stat().st_size
        if size > MAX_JSON_BYTES:
            raise _config_error(p, f"is {size} bytes, too large for a config", "restore the file")
        # Non-blocking, regular files only (a FIFO swapped in meanwhile is refused, not read).
        cfg = json.loads(read_regular(p, MAX_JSON_BYTES).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        from safelora_cli.fsio import emfile_hint

        raise _config_error(
            p, f"cannot be read as JSON ({e})", emfile_hint(e) or "restore the file"
        ) from None
    if not isinstance(cfg, dict):
        raise _config_error(p, "is not a JSON object", "restore the file")
    peft_type = cfg.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise _config_error(
            p,
            f"peft_type is {peft_type!r}, not 'LORA'",
            "Safe LoRA applies to LoRA adapters only",
        )
    r = cfg.get("r", DEFAULT_R)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise _config_error(p, f"r must be a positive integer, got {r!r}", "fix the config")
    alpha = cfg.get("lora_alpha", DEFAULT_ALPHA)
    if not _finite_number(alpha):
        raise _config_error(p, f"lora_alpha must be a number, got {alpha!r}", "fix the config")
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict):
            raise _config_error(p, f"{key} must be an object", "fix the config")
        for k, v in pat.items():
            try:
                re.compile(rf"(.*\.)?({k})$")
            except (re.error, OverflowError, RecursionError, MemoryError) as e:
                # OverflowError: a{99999999999}; RecursionError: thousands of nested groups.
                raise _config_error(
                    p, f"{key} key {k[:80]!r} is not a valid regex ({e})", "fix the config"
                ) from None
            ok = (
                isinstance(v, int) and not isinstance(v, bool) and v > 0
                if key == "rank_pattern"
                else _finite_number(v)
            )
            if not ok:
                raise _config_error(p, f"{key}[{k!r}] = {v!r} is not valid", "fix the config")
    for flag in ("fan_in_fan_out", "use_rslora", "use_dora"):
        if not isinstance(cfg.get(flag, False) or False, bool):
            raise _config_error(p, f"{flag} must be true or false", "fix the config")
    if cfg.get("layer_replication"):
        raise _config_error(
            p,
            "layer_replication is set: its LoRA tensors name replicated layers, not base weights",
            "Safe LoRA cannot map this adapter onto the base checkpoint",
        )
    if cfg.get("target_parameters"):
        raise _config_error(
            p,
            "target_parameters is set: LoRA on raw parameters has no linear-layer orientation",
            "Safe LoRA supports LoRA on linear / Conv1D modules (target_modules) only",
        )
    return cfg


# ----------------------------------------------------------------------------- weights


def _open_weights(directory: Path) -> tuple[Path, CheckpointReader | None, _BinTensors | None]:
    from safelora_cli.errors import CheckpointError
    from safelora_cli.reader import CheckpointReader

    st = directory / SAFETENSORS_NAME
    _refuse_special(st)
    if st.is_file():
        try:
            reader = CheckpointReader.open(st, label="adapter")
        except CheckpointError as e:
            raise AdapterError(e.message, hint=e.hint, path=st) from None
        # No handle is kept between reads: a run over thousands of adapters holds at most one
        # adapter file open at a time (issue 15, scale), not one per adapter.
        reader.max_open = 0
        return st, reader, None
    b = directory / BIN_NAME
    _refuse_special(b)
    if b.is_file():
        return b, None, _BinTensors(_load_bin(b))
    raise AdapterError(
        f"adapter: no {SAFETENSORS_NAME} (or legacy {BIN_NAME}) in {directory}",
        hint="the adapter directory lacks its weights; download or save it again",
        path=directory,
    )


def _refuse_special(p: Path) -> None:
    """AdapterError when ``p`` exists but (links followed) is a FIFO, socket or device.

    By ``stat`` alone: nothing is opened, so a FIFO named like an adapter file never blocks.
    """
    import stat

    from safelora_cli.fsio import kind_of

    try:
        mode = p.stat().st_mode
    except OSError:
        return  # absent (or a broken link): the caller's "no such file" message applies
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise AdapterError(
            f"adapter: {p} is {kind_of(mode)}, not a regular file",
            hint="replace it by the file itself (as written by save_pretrained)",
            path=p,
        )


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    import torch

    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols on stderr; the outcome is reported below.
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise AdapterError(
            f"adapter: {path} cannot be loaded with torch.load(weights_only=True) "
            f"({_why_unpickling_failed(e)})",
            hint="only plain tensor state dicts are read (nothing else is unpickled); "
            "save the adapter as safetensors",
            path=path,
        ) from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise AdapterError(
            f"adapter: {path} is not a state dict of named tensors",
            hint="save the adapter with PEFT's save_pretrained",
            path=path,
        )
    return {k: v.contiguous() for k, v in obj.items()}


def _why_unpickling_failed(e: BaseException) -> str:
    """A short reason from torch's (long, multi-paragraph) weights_only error."""
    text = " ".join(str(e).split())
    marker = "Unsupported global:"
    if marker in text:
        return "it holds a non-tensor object: " + text.split(marker, 1)[1].split(".", 1)[0][:80]
    if "Weights only load failed" in text:
        return "it holds objects other than tensors"
    return (text[:120] + "...") if len(text) > 120 else (text or type(e).__name__)


@dataclass
class _Parts:
    """The tensors of one module, sorted by role."""

    a: dict[str | None, str] = field(default_factory=dict)  # adapter name -> key
    b: dict[str | None, str] = field(default_factory=dict)
    b_bias: list[str] = field(default_factory=list)
    dora: list[str] = field(default_factory=list)
    emb: list[str] = field(default_factory=list)
    unknown: dict[str, str] = field(default_factory=dict)  # key -> lora part
    other: list[str] = field(default_factory=list)

    def keys(self) -> list[str]:
        ks = [*self.a.values(), *self.b.values(), *self.b_bias, *self.dora, *self.emb]
        return natural_sorted([*ks, *self.unknown, *self.other])


def _split_key(key: str) -> tuple[str, str | None, list[str]]:
    """``(module, lora part or None, components after the part)`` of an adapter key."""
    name = key.removeprefix(PEFT_PREFIX)
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.startswith("lora_"):
            return ".".join(parts[:i]), p, parts[i + 1 :]
    for i, p in enumerate(parts):
        if p in _COPY_PARTS and i > 0:
            return ".".join(parts[:i]), None, parts[i:]
    if len(parts) > 1:
        return ".".join(parts[:-1]), None, parts[-1:]
    return name, None, []


def _adapter_name_of(rest: list[str], key: str, path: Path) -> tuple[str | None, str]:
    """Split ``["default", "weight"]`` / ``["weight"]`` / ``["bias"]`` into (adapter, param)."""
    if len(rest) == 1:
        return None, rest[0]
    if len(rest) == 2:
        return rest[0], rest[1]
    raise AdapterError(
        f"adapter: {path}: cannot parse LoRA tensor key {key!r}",
        hint="expected <module>.lora_A[.<adapter>].weight as PEFT writes it",
        path=path,
    )


def _group(keys: Iterable[str], path: Path) -> dict[str, _Parts]:
    groups: dict[str, _Parts] = {}
    for key in keys:
        module, part, rest = _split_key(key)
        g = groups.setdefault(module, _Parts())
        if part is None:
            g.other.append(key)
        elif part in _A_PARTS or part in _B_PARTS:
            adapter, param = _adapter_name_of(rest, key, path)
            if param == "bias" and part in _B_PARTS:
                g.b_bias.append(key)
            elif param != "weight":
                raise AdapterError(
                    f"adapter: {path}: unexpected LoRA tensor {key!r}",
                    hint="expected lora_A.weight, lora_B.weight or lora_B.bias",
                    path=path,
                )
            else:
                (g.a if part in _A_PARTS else g.b)[adapter] = key
        elif part == _DORA_PART:
            g.dora.append(key)
        elif part in _EMB_PARTS:
            g.emb.append(key)
        else:
            g.unknown[key] = part
    return groups


def _is_modules_to_save(module: str, key: str, cfg: dict) -> bool:
    if ".modules_to_save." in f".{key}." or ".original_module." in f".{key}.":
        return True
    mts = cfg.get("modules_to_save") or []
    # PEFT's rule: a module is a modules_to_save copy when its name ends with an entry.
    return any(module == m or module.endswith("." + m) for m in mts if isinstance(m, str))


def _other_reason(module: str, keys: list[str], cfg: dict) -> str:
    if any(_is_modules_to_save(module, k, cfg) for k in keys):
        return REASON_MODULES_TO_SAVE
    if any(".base_layer." in f".{k}." for k in keys):
        return REASON_BASE_LAYER
    return REASON_OTHER.format(what=", ".join(k.rsplit(".", 1)[-1] for k in keys))


# ----------------------------------------------------------------------------- building


def read_adapter(path: str | Path, *, source: SourceSpec | None = None) -> Adapter:
    """Read the local PEFT adapter directory ``path`` (or a file inside it) into an Adapter.

    AdapterError for anything that is not a well-formed LoRA adapter (see the module docstring).
    """
    d = Path(path)
    if d.is_file():
        d = d.parent
    if not d.is_dir():
        raise AdapterError(
            f"adapter: {d} is not a directory",
            hint="pass a PEFT adapter directory",
            path=d,
        )
    cfg = read_config(d)
    weights_path, reader, bin_tensors = _open_weights(d)
    adapter = Adapter(
        path=d,
        source=source,
        config=cfg,
        weights_path=weights_path,
        modules=[],
        skipped=[],
        reader=reader,
        _bin=bin_tensors,
    )
    try:
        _fill(adapter)
    except BaseException:
        adapter.close()
        raise
    return adapter


def _fill(ad: Adapter) -> None:
    cfg = ad.config
    wp = ad.weights_path
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    use_rslora = bool(cfg.get("use_rslora", False))
    use_dora = bool(cfg.get("use_dora", False))
    groups = _group(ad.tensor_names(), wp)
    if not any(g.a or g.b or g.emb or g.dora for g in groups.values()):
        raise AdapterError(
            f"adapter: {wp} holds no LoRA tensors (lora_A / lora_B)",
            hint="is this a PEFT LoRA adapter? it may be a full model or another PEFT method",
            path=wp,
        )

    modules: list[LoraModule] = []
    skipped: list[SkippedModule] = []
    ranks = resolve_all(
        cfg,
        [m for m, g in groups.items() if g.a or g.b],
        where=str(ad.path / CONFIG_NAME),
    )
    for module in natural_sorted(groups):
        g = groups[module]
        if not (g.a or g.b):
            if g.emb:
                skipped.append(SkippedModule(module, tuple(g.keys()), REASON_EMBEDDING))
            elif g.dora or g.unknown:
                # A magnitude vector (or unknown LoRA part) without A/B: report, carry over.
                what = g.dora[0] if g.dora else next(iter(g.unknown))
                skipped.append(
                    SkippedModule(module, tuple(g.keys()), REASON_OTHER.format(what=what))
                )
            else:
                skipped.append(
                    SkippedModule(module, tuple(g.keys()), _other_reason(module, g.other, cfg))
                )
            continue
        key_a, key_b = _pair(module, g, wp)
        shape_a, shape_b = ad.shape(key_a), ad.shape(key_b)
        if len(shape_a) != len(shape_b) or len(shape_a) not in (2, 3, 4, 5):
            raise AdapterError(
                f"adapter: {wp}: {key_a} has shape {list(shape_a)} and {key_b} has "
                f"{list(shape_b)}; expected 2-D [r, d_in] and [d_out, r]",
                hint="the adapter file is malformed; save it again",
                path=wp,
            )
        if len(shape_a) != 2:
            skipped.append(
                SkippedModule(module, tuple(g.keys()), REASON_CONV.format(ndim=len(shape_a)))
            )
            continue
        if g.emb or g.unknown:
            what = ", ".join([*(k.rsplit(".", 1)[-1] for k in g.emb), *g.unknown.values()])
            skipped.append(
                SkippedModule(module, tuple(g.keys()), REASON_UNKNOWN_LORA.format(part=what))
            )
            continue
        if g.dora or use_dora:
            skipped.append(SkippedModule(module, tuple(g.keys()), REASON_DORA))
            continue
        full = [k for k in g.other if len(ad.shape(k)) >= 2]
        if full:
            # The adapter also replaces the module's own weight: B alone is not its update.
            skipped.append(
                SkippedModule(module, tuple(g.keys()), REASON_REPLACED.format(what=", ".join(full)))
            )
            continue
        r_a, d_in = shape_a
        d_out, r_b = shape_b
        r_cfg, alpha = ranks[module]
        if r_a != r_b or r_a != r_cfg:
            raise AdapterError(
                f"adapter: {wp}: {module} has rank {r_a} in lora_A {list(shape_a)} and {r_b} "
                f"in lora_B {list(shape_b)}; the config says r = {r_cfg}",
                hint="the adapter weights and adapter_config.json (r / rank_pattern) disagree",
                path=wp,
            )
        for k in (key_a, key_b):
            if ad.dtype(k) not in ("F16", "BF16", "F32", "F64"):
                raise AdapterError(
                    f"adapter: {wp}: {k} has dtype {ad.dtype(k)}; LoRA weights must be float",
                    hint="quantised adapters are not supported; save it in fp16/bf16/fp32",
                    path=wp,
                )
        notes: list[str] = []
        for kb in g.b_bias:
            if ad.shape(kb) != (d_out,):
                raise AdapterError(
                    f"adapter: {wp}: {kb} has shape {list(ad.shape(kb))}, expected [{d_out}]",
                    hint="the adapter file is malformed; save it again",
                    path=wp,
                )
            notes.append(NOTE_BIAS)
        if g.other:
            notes.append(NOTE_EXTRA.format(what=", ".join(g.other)))
        modules.append(
            LoraModule(
                name=module,
                key_a=key_a,
                key_b=key_b,
                rank=r_a,
                alpha=float(alpha),
                scale=lora_scale(float(alpha), r_a, use_rslora=use_rslora),
                fan_in_fan_out=fan_in_fan_out,
                d_out=d_out,
                d_in=d_in,
                dtype=ad.dtype(key_b),
                note="; ".join(notes) if notes else None,
            )
        )
    ad.modules = sorted(modules, key=lambda m: natural_key(m.name))
    ad.skipped = sorted(skipped, key=lambda s: natural_key(s.name))


def _pair(module: str, g: _Parts, wp: Path) -> tuple[str, str]:
    names = set(g.a) | set(g.b)
    if len(names) > 1:
        shown = ", ".join(sorted(str(n) if n is not None else "(none)" for n in names))
        raise AdapterError(
            f"adapter: {wp}: {module} has LoRA tensors for several adapters ({shown})",
            hint="save each adapter to its own directory (PEFT save_pretrained does)",
            path=wp,
        )
    (name,) = names
    if name not in g.a:
        raise AdapterError(
            f"adapter: {wp}: {g.b[name]} has no matching lora_A",
            hint="the adapter file is incomplete; save it again",
            path=wp,
        )
    if name not in g.b:
        raise AdapterError(
            f"adapter: {wp}: {g.a[name]} has no matching lora_B",
            hint="the adapter file is incomplete; save it again",
            path=wp,
        )
    return g.a[name], g.b[name]


def base_fan_in_fan_out(
    m: LoraModule, base_shape: tuple[int, ...], *, model_type: str | None = None
) -> bool:
    """Whether ``m``'s base weight is stored ``[in, out]``, decided as PEFT decides it.

    PEFT looks at the layer class, not only at the config: it forces ``fan_in_fan_out`` on for
    ``Conv1D`` layers and off for ``nn.Linear`` (with a warning). Without the model classes, the
    base config's ``model_type`` stands in: in the GPT-2 family (:data:`CONV1D_MODEL_TYPES`)
    the layers in :data:`CONV1D_LEAVES` are Conv1D and every other layer is Linear; for other
    known model types every LoRA target is Linear. With ``model_type=None`` the adapter config
    decides, unless only the other orientation fits ``base_shape``. The result is checked
    against ``base_shape`` (AdapterError when it fits neither orientation, naming the module
    and both shapes).
    """
    leaf = m.name.rsplit(".", 1)[-1]
    if model_type is None:
        fif = m.fan_in_fan_out
    else:
        fif = model_type in CONV1D_MODEL_TYPES and leaf in CONV1D_LEAVES
    want = (m.d_in, m.d_out) if fif else (m.d_out, m.d_in)
    if tuple(base_shape) != want:
        other = (m.d_out, m.d_in) if fif else (m.d_in, m.d_out)
        if model_type is None and tuple(base_shape) == other:
            return not fif
        raise AdapterError(
            f"adapter module {m.name} is {m.d_out} x {m.d_in} (out x in) but the base weight "
            f"{m.weight_name} has shape {list(base_shape)}",
            hint="the adapter was trained on another base model; pass the matching BASE",
        )
    return fif


def orient_for_base(adapters: Iterable[Adapter], model_type: str | None) -> None:
    """Set each module's ``fan_in_fan_out`` to what PEFT uses on a base of ``model_type``.

    PEFT decides the orientation from the layer class when it loads an adapter (Conv1D forces
    ``fan_in_fan_out`` on, ``nn.Linear`` off), whatever the config says; a config that disagrees
    (adapters saved by other tools) would otherwise pick the wrong orientation silently on a
    square Conv1D weight. Modules are replaced in place, with a ``note`` saying so.
    ``model_type`` None (no ``config.json``) leaves the adapter config in charge.
    """
    import dataclasses

    if model_type is None:
        return
    for ad in adapters:
        for i, m in enumerate(ad.modules):
            fif = model_type in CONV1D_MODEL_TYPES and m.name.rsplit(".", 1)[-1] in CONV1D_LEAVES
            if fif != m.fan_in_fan_out:
                why = (
                    f"fan_in_fan_out taken as {str(fif).lower()}: the base is {model_type}, "
                    f"whose {m.name.rsplit('.', 1)[-1]} is {'Conv1D' if fif else 'Linear'} "
                    "(PEFT does the same)"
                )
                note = f"{m.note}; {why}" if m.note else why
                ad.modules[i] = dataclasses.replace(m, fan_in_fan_out=fif, note=note)


def load_adapter(arg: str | Path, *, revision: str | None = None) -> Adapter:
    """Resolve ``arg`` (local directory or Hub id) and read the adapter.

    SourceError when it cannot be resolved; AdapterError when it is not a usable LoRA adapter.
    """
    from safelora_cli.sources import resolve_adapter

    directory, spec = resolve_adapter(str(arg), revision=revision)
    return read_adapter(directory, source=spec)


def load_adapters(args: Iterable[str | Path]) -> list[Adapter]:
    """Every adapter read and validated before anything else happens (nothing half-done).

    On any failure the adapters already opened are closed before the error propagates.
    """
    loaded: list[Adapter] = []
    try:
        for arg in args:
            loaded.append(load_adapter(arg))
    except BaseException:
        for ad in loaded:
            ad.close()
        raise
    return loaded
