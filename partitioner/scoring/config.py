"""``ScoringConfig``: how pairs are scored, and the settings a resumed job must match.

Every field changes the numbers in the scored folder unless its metadata says ``"guards_resume": False`` (how the
job runs, or what was loaded, which the input fingerprint covers). :func:`job_settings` derives the recorded
settings from the fields, so a new option guards resumption without anyone remembering to add it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from scorers.flex_attention import packed_attention_field
from scorers.onednn import LINEAR_KERNELS
from sdpo_core.columns import DIFFICULTY, Direction
from sdpo_core.config import check_ranges
from sdpo_core.errors import ConfigError
from sdpo_core.option_fields import (batch_tokens_field, device_field, dtype_field, max_length_field,
                                     truncation_mode_field)
from scorers.signals import check_models, parse_signals

from ..io import library_version
from .backends import BACKEND_NAMES

SCHEMA_VERSION = 1
# vLLM server client options that change how requests travel, never a number.
VLLM_TRANSPORT_OPTIONS = ("max_concurrency", "timeout", "retries", "backoff", "max_backoff", "api_key")


def _not_guarded(help_: str) -> dict:
    return {"help": help_, "guards_resume": False}


@dataclass
class ScoringConfig:
    """How pairs are scored. A rerun into the same folder must match every field that guards resumption."""

    model: str = field(default="bundled", metadata={"help": "Reference model: local path, hub id or 'bundled'."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer path; default: the model's."})
    dtype: str = dtype_field()
    max_length: int | None = max_length_field()
    truncation_mode: str = truncation_mode_field()
    signals: list[str] = field(
        default_factory=lambda: ["ref_margin", "ref_margin_per_token"],
        metadata={"help": "Difficulty signals (comma-separated; scorers.signals.SIGNALS); the first is the "
                          "difficulty unless difficulty_signal names another."},
    )
    difficulty_signal: str | None = field(default=None, metadata={"help": "Signal written as `difficulty`."})
    batch_tokens: int = batch_tokens_field()
    rows_per_part: int = field(default=256, metadata={"min": 1, "help": "Rows per output part (the resume unit)."})
    packed: bool = field(default=True, metadata={"help": "Compute each prompt once (prefix-shared packed rows)."})
    beta: float = field(default=0.1, metadata={"min": 0, "help": "beta of the implicit_reward signal."})
    policy_model: str | None = field(default=None, metadata={"help": "pi of implicit_reward (vs. the reference)."})
    reward_model: str | None = field(default=None, metadata={"help": "Sequence-classification reward model."})
    rating_columns: list[str] = field(
        default_factory=lambda: ["score_chosen", "score_rejected"], metadata={"help": "Columns of rating_gap."}
    )
    seed: int = field(default=0, metadata={"min": 0, "help": "Seed of the random signal."})
    linear_kernel: str = field(default="auto", metadata={
        "choices": LINEAR_KERNELS,
        "help": "transformers backend: fp32 GEMM of the linear layers on CPU: auto (oneDNN where a short measurement "
                "finds it faster on this host; resolved once per scored folder and recorded), onednn or torch "
                "(torch's default, MKL)."})
    packed_attention: str = packed_attention_field()
    backend: str = field(default="transformers", metadata={
        "choices": BACKEND_NAMES,
        "help": "Reference log-prob backend: transformers, vllm (offline engine) or vllm-server (a running server)."})
    vllm_options: dict = field(default_factory=dict, metadata={
        "help": "vllm/vllm-server: keyword options of VLLMBackend / VLLMServerBackend, as JSON (e.g. "
                "'{\"tensor_parallel_size\": 2}')."})
    server_url: str | None = field(default=None, metadata=_not_guarded("vllm-server: the server's base URL."))
    server_model: str | None = field(default=None, metadata=_not_guarded("vllm-server: served name, if not model."))
    limit: int | None = field(default=None, metadata={"min": 1, **_not_guarded("Score only the first N loaded rows.")})
    overwrite: bool = field(default=False, metadata=_not_guarded("Start over when the folder holds other results."))
    device: str | None = device_field(guards_resume=False)
    progress: bool = field(default=True, metadata=_not_guarded("Show progress bars."))

    def __post_init__(self):
        check_ranges(self)
        if isinstance(self.signals, str):
            self.signals = [s.strip() for s in self.signals.split(",") if s.strip()]
        if isinstance(self.rating_columns, str):
            self.rating_columns = [s.strip() for s in self.rating_columns.split(",") if s.strip()]
        self.signals = [s.name for s in parse_signals(self.signals)]  # raises on unknown names
        if self.difficulty_signal is None:
            self.difficulty_signal = self.signals[0]
        if self.difficulty_signal not in self.signals:
            raise ConfigError(f"difficulty_signal {self.difficulty_signal!r} is not among signals {self.signals}")
        check_models(parse_signals(self.signals), self)
        if len(self.rating_columns) != 2:
            raise ConfigError("rating_columns must name two columns: chosen's and rejected's")
        if self.backend == "vllm-server" and not self.server_url:
            raise ConfigError("backend vllm-server needs server_url (--server-url http://HOST:PORT)")


def pin_linear_kernel(config: ScoringConfig, settings: dict, out) -> tuple[ScoringConfig, dict]:
    """``linear_kernel="auto"`` resolved once for the scored folder ``out``, so every part of it is computed with the
    same kernel whichever process computes it (a resumed job, Ray actors): the answer is a timing that can differ
    between processes where oneDNN's and MKL's GEMMs are close (:func:`scorers.onednn.auto_linear_kernel`).

    Returns the config the scorers run (``linear_kernel`` the resolved ``"onednn"``/``"torch"``) and the settings
    with ``linear_kernel_resolved`` added. A rerun into a folder whose other settings match reuses the recorded
    answer instead of measuring again; explicit ``"onednn"``/``"torch"`` and the vLLM backends pass unchanged.
    """
    import json
    from pathlib import Path

    from scorers.onednn import auto_linear_kernel

    if config.linear_kernel != "auto" or config.backend != "transformers":
        return config, settings
    recorded = None
    path = Path(out) / "settings.json"
    try:
        old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        old = None  # prepare_folder reports an unreadable settings file
    if isinstance(old, dict) and {k: v for k, v in old.items() if k != "linear_kernel_resolved"} == settings:
        recorded = old.get("linear_kernel_resolved")
    resolved = recorded if recorded in ("onednn", "torch") else auto_linear_kernel(config.model, config.dtype,
                                                                                    config.device)
    return dataclasses.replace(config, linear_kernel=resolved), {**settings, "linear_kernel_resolved": resolved}


def job_settings(config: ScoringConfig, tokenizer, input_info: dict) -> dict:
    """What the scored folder's numbers depend on, derived from every field of ``config`` that guards resumption.

    The layout (model fingerprints instead of paths, a ``tokenizer`` block the trainer reads back) is the one
    ``scoring.json`` records (CONTRACTS.md section 2).
    """
    from scorers.models import chat_template_sha256, model_fingerprint

    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.metadata.get("guards_resume", True)}
    signals = parse_signals(values.pop("signals"))
    tokenizer_block = {
        "name_or_path": values.pop("tokenizer") or config.model,
        "max_length": values.pop("max_length"),
        "truncation_mode": values.pop("truncation_mode"),
        "chat_template_sha256": chat_template_sha256(tokenizer),
    }
    model = model_fingerprint(values.pop("model"))
    dtype = values.pop("dtype")
    difficulty = {"signal": values.pop("difficulty_signal"), "column": DIFFICULTY,
                  "direction": Direction.HIGHER_IS_HARDER.value}
    for name in ("policy_model", "reward_model"):
        values[name] = model_fingerprint(values[name]) if values[name] else None
    values["vllm_options"] = {k: v for k, v in sorted(values["vllm_options"].items())
                              if k not in VLLM_TRANSPORT_OPTIONS}
    values["rating_columns"] = list(values["rating_columns"])
    return {
        "schema_version": SCHEMA_VERSION,
        "library_version": library_version(),
        "model": model,
        "dtype": dtype,
        "tokenizer": tokenizer_block,
        "signals": [s.meta() for s in signals],
        "difficulty": difficulty,
        "scoring": values,
        "input": input_info,
    }
