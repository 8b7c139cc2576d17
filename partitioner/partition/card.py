"""The partition's dataset card, ``README.md``: what makes the folder a dataset repository.

Its YAML front matter declares the configs the Hugging Face ``datasets`` loaders (local and Hub) read: ``default``
with one split per chunk in curriculum order (``chunk_000``, ``chunk_001``, ...; the Parquet files where there are
any), and ``rejects`` (``rejects.arrow``, when it has rows). Every path is a plain file name relative to the folder,
so the folder loads the same from a local path and, uploaded as it is, from the Hub by name. The body holds the
curriculum (order, chunking, seed), the scoring model and signals, the per-chunk statistics ``sdpo stats`` prints
and the reject reasons. It is written before the manifest, which records its sha256 (``card_sha256``). It holds no
time and no absolute path, so a rerun on the same input writes the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.rejects import REJECTS_FILE
from ..io import atomic_write
from .layout import CARD, CARD_MARKER, split_name
from .stats import chunk_stats

REJECTS_CONFIG = "rejects"
TAGS = ["dpo", "preference", "curriculum-learning", "sdpo-curriculum"]


def write_card(out_dir: Path, manifest: dict) -> str:
    """Write ``out_dir/README.md`` for ``manifest`` (the one about to be written) atomically; returns its sha256."""
    stats = chunk_stats(out_dir, manifest["chunks"], manifest["rows_kept"])
    return atomic_write(Path(out_dir) / CARD, card_text(manifest, stats))


def data_file(chunk: dict) -> str:
    """The file a chunk's split reads: its Parquet copy where there is one (what the Hub's viewer reads best)."""
    return chunk["parquet"]["file"] if chunk.get("parquet") else chunk["file"]


def card_configs(manifest: dict) -> list[dict]:
    """The ``configs`` of the card's front matter."""
    configs = [{"config_name": "default", "default": True,
                "data_files": [{"split": split_name(c["index"]), "path": data_file(c)} for c in manifest["chunks"]]}]
    if manifest["rows_rejected"]:  # datasets refuses a split with no rows: the config exists when there are rejects
        configs.append({"config_name": REJECTS_CONFIG,
                        "data_files": [{"split": "train", "path": rejects_file(manifest)}]})
    return configs


def rejects_file(manifest: dict) -> str:
    """The rejects config's file: ``rejects.parquet`` beside Parquet shards (datasets reads all configs of a folder
    with the builder of the default config's files), else ``rejects.arrow``."""
    return (manifest.get("rejects_parquet") or {}).get("file") or REJECTS_FILE


def _md(value) -> str:
    """``value`` as one line of Markdown table text (no pipes, newlines or backticks that would break it)."""
    return " ".join(str(value).split()).replace("|", "\\|").replace("`", "'")


def _num(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return _md(value)


def _model(model: dict | None) -> str:
    """The scoring model by name; a local folder by its name and content hash (no absolute path in the card)."""
    if not model:
        return "none"
    name = str(model.get("name_or_path", "?"))
    text = f"`{_md(Path(name).name)}` (a local folder)" if Path(name).is_absolute() else f"`{_md(name)}`"
    for key in ("revision", "content_hash", "architecture"):
        if model.get(key):
            text += f", {key.replace('_', ' ')} `{_md(model[key])}`"
    return text


def _value(value) -> str:
    return f"`{_md(json.dumps(value, ensure_ascii=False))}`" if isinstance(value, (dict, list)) else f"`{_md(value)}`"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _front_matter(manifest: dict) -> str:
    import yaml

    meta = {"configs": card_configs(manifest), "tags": TAGS}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, default_flow_style=False, allow_unicode=True) + "---\n"


def _curriculum(manifest: dict) -> list[str]:
    o, ch = manifest.get("ordering") or {}, manifest.get("chunking") or {}
    lines = [f"- order: `{_md(o.get('order'))}`" + (f" by signal `{_md(o['signal'])}`" if o.get("signal") else "")
             + (f" (column `{_md(o['column'])}`)" if o.get("column") and o.get("column") != o.get("signal") else "")]
    lines += [f"- {k.replace('_', ' ')}: {_value(v)}" for k, v in o.items() if k not in ("order", "signal", "column")]
    lines.append(f"- chunking: `{_md(ch.get('mode'))}`, {len(manifest['chunks'])} chunks"
                 + "".join(f", {k.replace('_', ' ')} {_value(ch[k])}"
                           for k in ("fractions", "thresholds", "quantiles") if ch.get(k) is not None)
                 + (", shuffled within each chunk" if ch.get("shuffle_within") else ""))
    lines.append(f"- rows: {manifest['rows_in']} read, {manifest['rows_kept']} in the chunks, "
                 f"{manifest['rows_rejected']} rejected")
    return lines


def _scoring(scoring: dict | None) -> list[str]:
    if not scoring:
        return ["Unscored input: no reference model was run."]
    tok = scoring.get("tokenizer") or {}
    diff = scoring.get("difficulty") or {}
    lines = [f"- reference model: {_model(scoring.get('model'))}, dtype `{_md(scoring.get('dtype'))}`",
             f"- tokens: max_length `{_md(tok.get('max_length'))}`, truncation `{_md(tok.get('truncation_mode'))}`",
             f"- difficulty (higher = harder): signal `{_md(diff.get('signal'))}`", ""]
    signals = scoring.get("signals") or []
    lines += _table(["signal", "column", "direction", "formula"],
                    [[f"`{_md(s.get('name'))}`", f"`{_md(s.get('column'))}`", _md(s.get("direction")),
                      f"`{_md(s.get('formula'))}`"] for s in signals]) if signals else []
    return lines


def card_text(manifest: dict, stats: list[dict]) -> str:
    """The card's text (deterministic: the same manifest and statistics give the same bytes)."""
    order = (manifest.get("ordering") or {}).get("order")
    has_rejects = bool(manifest["rows_rejected"])
    load = ['```python', 'from datasets import load_dataset', '',
            'chunks = load_dataset("PATH_OR_REPO_ID")   # DatasetDict: chunk_000, chunk_001, ... in curriculum order']
    if has_rejects:
        load.append(f'rejects = load_dataset("PATH_OR_REPO_ID", "{REJECTS_CONFIG}")["train"]')
    load.append('```')
    columns = [k for k in stats[0]] if stats else []
    rows = [[f"`{split_name(r['chunk'])}`", f"`{data_file(c)}`"] + [_num(r.get(k, "")) for k in columns[1:]]
            for r, c in zip(stats, manifest["chunks"])]
    parts = [
        _front_matter(manifest), CARD_MARKER, "",
        f"# Stepwise-DPO curriculum: {len(manifest['chunks'])} chunks, {_md(order)}", "",
        f"Preference pairs ordered into a curriculum by sdpo-curriculum {_md(manifest.get('library_version'))}. "
        "Train on the chunks in order: step 1 on `chunk_000`, step 2 on `chunk_001`, and so on. Each chunk is a "
        "split of the default config" + (f"; the pairs left out on the way are the `{REJECTS_CONFIG}` config."
                                          if has_rejects else "; no pair was left out."), "",
        *load, "",
        "`sdpo train PATH --output-dir run` trains on the chunks in order; `sdpo verify PATH` checks every file "
        "(this card included) against `manifest.json`, which records inputs, settings and checksums.", "",
        "## Curriculum", "", *_curriculum(manifest), "",
        "## Scoring", "", *_scoring(manifest.get("scoring")), "",
        "## Chunks", "", *_table(["split", "file"] + columns[1:], rows), "",
    ]
    if has_rejects:
        reasons = manifest.get("reject_reasons") or {}
        parts += ["## Rejects", "", f"`{rejects_file(manifest)}` ({REJECTS_CONFIG} config), by reason:", "",
                  *_table(["reason", "rows"], [[f"`{_md(k)}`", str(v)] for k, v in reasons.items()]), ""]
    return "\n".join(parts)
