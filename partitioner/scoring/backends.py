"""The reference log-prob backends ``ScoringConfig.backend`` names: :data:`BACKENDS`, each declared once with its
help text (README.md's backend table shows it) and how it is built from a ``ScoringConfig``.

The builders take the config without importing its class: ``partitioner.scoring.config`` checks its ``backend``
against :data:`BACKEND_NAMES` from here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from scorers.backend import LogProbBackend
from sdpo_core.errors import ConfigError


@dataclass(frozen=True)
class Backend:
    """A way to compute the reference log-probs (``ScoringConfig.backend``)."""

    name: str
    help: str  # README.md's backend table shows it
    build: Callable[..., LogProbBackend]  # (config, the options every backend takes) -> backend


def _transformers(config, common: dict) -> LogProbBackend:
    from scorers.transformers_backend import TransformersBackend

    return TransformersBackend(config.model, dtype=config.dtype, batch_tokens=config.batch_tokens,
                               packed=config.packed, device=config.device, linear_kernel=config.linear_kernel,
                               packed_attention=config.packed_attention, **common)


def _vllm(config, common: dict) -> LogProbBackend:
    from scorers.vllm_backend import VLLMBackend

    return _with_vllm_options(config, common, VLLMBackend,
                              dict(model=config.model, tokenizer=config.tokenizer, dtype=config.dtype))


def _vllm_server(config, common: dict) -> LogProbBackend:
    from scorers.vllm_server_backend import VLLMServerBackend

    return _with_vllm_options(config, common, VLLMServerBackend,
                              dict(url=config.server_url, model=config.model, served_model_name=config.server_model,
                                   tokenizer=config.tokenizer or config.model))


def _with_vllm_options(config, common: dict, cls, args: dict) -> LogProbBackend:
    """``cls(**args, **common, **config.vllm_options)``, refusing an option ``cls`` does not take.

    Raises:
        ConfigError: a vLLM option the backend does not take (one line, listing the known ones).
    """
    options = dict(config.vllm_options or {})
    allowed = set(inspect.signature(cls).parameters) - set(args) - set(common)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"unknown {config.backend} option(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(allowed))}")
    return cls(**args, **common, **options)


BACKENDS = {b.name: b for b in (
    Backend("transformers", "transformers on this process's device (the default; TRL-exact in fp32, each prompt "
            "computed once)", _transformers),
    Backend("vllm", "vLLM's offline engine in this process (`--vllm-options`: engine options)", _vllm),
    Backend("vllm-server", "a running OpenAI-compatible vLLM server (`--server-url`; `--vllm-options`: client "
            "options)", _vllm_server),
)}
BACKEND_NAMES = tuple(BACKENDS)


def make_backend(config) -> LogProbBackend:
    """The reference backend ``config.backend`` names, with ``config.vllm_options`` passed on to a vLLM backend.

    Raises:
        ConfigError: a vLLM option the backend does not take.
    """
    common = dict(max_length=config.max_length, truncation_mode=config.truncation_mode, progress=config.progress)
    return BACKENDS[config.backend].build(config, common)
