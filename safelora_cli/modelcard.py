"""Hugging Face model cards (``README.md``) for what safelora writes. Pure functions, no I/O.

A card is YAML front matter plus Markdown (the Hub's format, read by
``huggingface_hub.ModelCard``). :func:`render_card` merges safelora's keys into an existing
card, or starts one:

- ``base_model`` and ``library_name`` are set when the input card has none (a value the author
  wrote is kept); ``tags`` gains safelora's tags, without duplicates, after the author's;
  every other key and the Markdown text are kept as they were.
- The section (Markdown) is appended after the text, between :data:`BEGIN` and :data:`END`
  marker comments; a card that already has a marked section (an adapter patched twice) gets
  it replaced, not a second one.
- The output depends on its inputs only (no timestamps): the same inputs give the same bytes.

The front matter is parsed and written by ``huggingface_hub`` (``ModelCard`` /
``ModelCardData``, YAML through PyYAML's safe loader): no network, nothing executed.

:func:`adapter_card` is the card of a patched PEFT adapter (``patch``); a full-model patch
calls :func:`render_card` with ``library_name="transformers"`` and its own section.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from safelora_cli import __version__
from safelora_cli.errors import AdapterError

CARD_NAME = "README.md"
TAGS = ("safelora", "safe-lora")
PAPER = (
    "Hsu et al., *Safe LoRA: the Silver Lining of Reducing Safety Risks when Finetuning Large "
    "Language Models*, NeurIPS 2024 ([arXiv 2405.16833](https://arxiv.org/abs/2405.16833))"
)
BEGIN = "<!-- safelora:begin -->"
END = "<!-- safelora:end -->"

# A Hub repository id (``org/name`` or ``name``): what ``base_model`` may hold on the Hub.
# Local paths (``/home/me/llama``, ``./base``) are left out of the front matter.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_SECTION = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.S)


def is_hub_id(value: object) -> bool:
    """True for a string that can name a Hub repository (``org/name``), not a local path."""
    return (
        isinstance(value, str)
        and bool(_REPO_ID.match(value))
        and ".." not in value
        and not value.endswith((".json", ".safetensors", ".bin"))
    )


def render_card(
    existing: str | None,
    *,
    base_model: str | None,
    library_name: str,
    tags: Sequence[str] = TAGS,
    section: str,
    source: str = CARD_NAME,
) -> str:
    """The card text: ``existing`` (a README.md's text, or None) merged with safelora's keys and
    ``section`` (see the module docstring). ``base_model`` is used only when it is a Hub id.

    Raises AdapterError naming ``source`` when ``existing`` has front matter that is not a YAML
    mapping (the card could not be merged without losing the author's keys).
    """
    from huggingface_hub import ModelCard, ModelCardData

    body = section.strip("\n")
    block = f"{BEGIN}\n{body}\n{END}\n"
    text = existing if existing is not None else ""
    has_front = text.lstrip().startswith("---")
    if has_front:
        try:
            card = ModelCard(text)
        except Exception as exc:  # yaml.YAMLError or ValueError: the front matter is broken
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AdapterError(
                f"{source}: its YAML front matter cannot be read ({first}).",
                hint="Fix the block between the two --- lines (or remove it), then run again.",
                path=source,
            ) from None
        data = card.data
        markdown = card.text
    else:
        data = ModelCardData()
        markdown = text
    if getattr(data, "base_model", None) in (None, "", []) and is_hub_id(base_model):
        data.base_model = base_model
    if not getattr(data, "library_name", None):
        data.library_name = library_name
    old = data.tags or []
    if isinstance(old, str):
        old = [old]
    data.tags = list(dict.fromkeys([*(str(t) for t in old), *tags]))

    if _SECTION.search(markdown):
        markdown = _SECTION.sub(lambda _: block, markdown, count=1)
    else:
        markdown = markdown.rstrip("\r\n")
        markdown = f"{markdown}\n\n{block}" if markdown.strip() else f"\n{block}"
    if has_front:
        card.text = markdown  # type: ignore[possibly-undefined]
        return str(card)
    return f"---\n{data.to_yaml()}\n---\n{markdown}"


# ----------------------------------------------------------------------------- adapters


def _fmt_source(spec: Any) -> str:
    """A model source for a card: a Hub id with revision and commit, or a local checkpoint
    named by its directory name (never a path: cards are published)."""
    if not isinstance(spec, Mapping):
        return "unknown"
    if spec.get("kind") == "hub" or spec.get("repo_id"):
        out = f"[`{spec.get('repo_id')}`](https://huggingface.co/{spec.get('repo_id')})"
        rev = spec.get("revision")
        if rev:
            out += f", revision `{rev}`"
        if spec.get("commit"):
            out += f" (commit `{spec['commit']}`)"
        return out
    arg = str(spec.get("arg") or spec.get("path") or "").rstrip("/\\")
    name = re.split(r"[/\\]", arg)[-1] if arg else ""
    return f"a local checkpoint (`{name}`)" if name else "a local checkpoint"


def _selection_text(report: Any) -> str:
    sel = report.selection.to_json()
    flag = {"num_layers": "--num-layers", "threshold": "--threshold"}.get(sel["mode"], "--fraction")
    text = f"`{flag} {sel['value']}`"
    t = report.decision.threshold
    if sel["mode"] != "threshold" and t is not None:
        text += f" (modules with cosine <= {t:.5f}"
        ties = report.decision.ties
        text += f", {ties} more tied at the boundary)" if ties else ")"
    return text


def adapter_section(report: Any) -> str:
    """Markdown saying what patch did to one adapter, from an AdapterReport (or an object with
    its fields: selection, decision, modules, skipped, projected, total, pdst, sources)."""
    from safelora_cli.selection import round_cosine

    pdst = "n/a" if report.pdst is None else f"{report.pdst:.4f}"
    lines = [
        "## Safe LoRA",
        "",
        f"This adapter was patched with safelora {__version__}, which applies Safe LoRA "
        f"({PAPER}). For each selected LoRA module, `lora_B` was replaced by `C B`, its "
        "projection onto the alignment subspace (`C = V V^T / ||V||_F`, "
        "`V = W_aligned - W_base`); `lora_A`, `adapter_config.json` and every other tensor are "
        "unchanged.",
        "",
        f"- Selection: {_selection_text(report)}",
        f"- Projected: {report.projected} of {report.total} LoRA modules; Pdst {pdst}",
    ]
    sources = report.sources or {}
    if "base" in sources:
        lines.append(f"- Base (unaligned) model: {_fmt_source(sources['base'])}")
    if "aligned" in sources:
        lines.append(f"- Aligned model: {_fmt_source(sources['aligned'])}")
    if "cache" in sources:
        lines.append("- Projectors read from a safelora projection cache of these models")
    if report.skipped:
        lines.append(
            f"- Carried over unchanged (not LoRA modules safelora projects): {len(report.skipped)}"
        )
    lines += ["", "| module | cosine | projected |", "| --- | ---: | --- |"]
    for m in report.modules:
        cos = "-" if m.cosine is None else f"{round_cosine(m.cosine):.5f}"
        if m.projected:
            verdict = "yes"
        elif m.cosine is not None:
            verdict = "no: above the threshold"
        else:
            why = (m.reason or "").split(":", 1)[0]
            verdict = f"no: {why}" if why else "no"
        lines.append(f"| `{m.name}` | {cos} | {verdict.replace('|', '/')} |")
    lines += [
        "",
        "Per-module details (norms, reasons, sources) are in `safelora_report.json`.",
    ]
    return "\n".join(lines) + "\n"


def adapter_card(
    existing: str | None, report: Any, config: Mapping[str, Any], *, source: str = CARD_NAME
) -> str:
    """README.md of a patched adapter: ``existing`` (the input's README text, or None) with
    ``base_model`` from ``config['base_model_name_or_path']``, ``library_name: peft``, the
    safelora tags and :func:`adapter_section`."""
    return render_card(
        existing,
        base_model=config.get("base_model_name_or_path"),
        library_name="peft",
        tags=TAGS,
        section=adapter_section(report),
        source=source,
    )
