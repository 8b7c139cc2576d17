"""Reference log-probs from a running OpenAI-compatible vLLM server (``/v1/completions``).

The same sequences as :class:`scorers.vllm_backend.VLLMBackend` (our token ids, cut as TRL's collator cuts them)
are sent as token-id prompts with ``max_tokens=1`` and ``prompt_logprobs=0``; each choice's ``prompt_logprobs`` maps
the token actually at each position (JSON key: its id) to its log-prob, which we read (never a top-1) and sum.
Nothing is re-tokenized by the server, so ``echo`` and ``return_tokens_as_token_ids`` are not needed.

Requests carry ``batch_size`` prompts each, at most ``max_concurrency`` in flight; each has a ``timeout``.
Connection errors, timeouts and 5xx answers are retried with exponential backoff (``retries`` times); a 4xx answer
fails at once with the server's message. Results are assembled in input order, so they do not depend on the
order in which answers arrive. Before scoring, ``/v1/models`` must list the model the job expects and
``/tokenize`` must tokenize a probe text (chat-template markers included) exactly as the job's tokenizer does;
otherwise a one-line :class:`VLLMServerError` says what the server serves.

Only the standard library is used (``urllib``).
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .backend import LogProbBackend
from sdpo_core.columns import TRUNCATION_MODES
from sdpo_core.config import check_choice
from sdpo_core.errors import ConfigError, UserError
from .vllm_common import actual_logprob, collect, scored_positions, side_sequences

logger = logging.getLogger(__name__)

_PROBE = [{"role": "user", "content": "Hello, wörld! 12345 — naïve café? ¿Qué tal? 你好"}]


class VLLMServerError(UserError):
    """The server cannot be used for this job, or did not answer (one-line message)."""


class VLLMServerBackend(LogProbBackend):
    """DPOTrainer reference log-probs scored by a running vLLM OpenAI-compatible server.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is accepted).
        model: the model the job expects (path, hub id or ``"bundled"``); the server must serve it (checked on
            ``/v1/models``: served name or root equal to it, or the same resolved local path).
        tokenizer: the job's tokenizer (a loaded one, or a path); checked against the server's ``/tokenize``.
        served_model_name: the name the server serves the model under, when it differs from ``model`` (the
            name check is then skipped; the tokenizer check still runs).
        max_length, truncation_mode: ``DPOConfig``'s; the collator's truncation is applied.
        batch_size: prompts per request; max_concurrency: requests in flight.
        timeout: seconds per request; retries: attempts after the first on connection errors, timeouts and 5xx;
            backoff: first wait in seconds, doubling up to max_backoff (the longest wait between two attempts).
        api_key: sent as a bearer token when given.
        progress: one progress bar over pairs.

    Raises:
        VLLMServerError: the server is unreachable (after retries), serves another model or tokenizer, or rejects
            a request.
    """

    def __init__(
        self,
        url: str,
        model: str | None = None,
        tokenizer=None,
        served_model_name: str | None = None,
        max_length: int | None = 1024,
        truncation_mode: str = "keep_start",
        batch_size: int = 16,
        max_concurrency: int = 4,
        timeout: float = 600.0,
        retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        api_key: str | None = None,
        progress: bool = True,
    ):
        check_choice("truncation_mode", truncation_mode, TRUNCATION_MODES)
        numbers = {"batch_size": batch_size, "max_concurrency": max_concurrency, "retries": retries, "timeout": timeout,
                   "backoff": backoff, "max_backoff": max_backoff}
        wrong = [k for k, v in numbers.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
        if wrong:  # e.g. a string in --vllm-options: one line, not a TypeError below
            raise ConfigError(f"{', '.join(wrong)} must be number(s)")
        if batch_size < 1 or max_concurrency < 1 or retries < 0 or timeout <= 0 or not 0 <= backoff <= max_backoff:
            raise ConfigError("batch_size and max_concurrency must be >= 1, retries >= 0, timeout > 0, "
                              "0 <= backoff <= max_backoff")
        self.url = url.rstrip("/").removesuffix("/v1")
        self.max_length, self.truncation_mode = max_length, truncation_mode
        self.batch_size, self.max_concurrency = batch_size, max_concurrency
        self.timeout, self.retries, self.api_key = timeout, retries, api_key
        self.backoff, self.max_backoff = backoff, max_backoff
        self.progress = progress
        self.served, self.max_model_len = self._check_model(model, served_model_name)
        if tokenizer is not None:
            self._check_tokenizer(tokenizer)

    # -- HTTP -------------------------------------------------------------------------------------------------

    def _request(self, path: str, payload: dict | None = None) -> dict:
        """GET (payload None) or POST JSON with retries on connection errors, timeouts and 5xx."""
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                wait = min(self.backoff * 2.0 ** min(attempt - 1, 64), self.max_backoff)  # no float overflow
                logger.warning("vLLM server %s%s: %s; retry %d/%d in %.1f s", self.url, path, last, attempt,
                               self.retries, wait)
                time.sleep(wait)
            req = urllib.request.Request(self.url + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                body = e.read().decode(errors="replace")
                if e.code >= 500:
                    last = f"HTTP {e.code}"
                    continue
                raise VLLMServerError(f"vLLM server {self.url}{path} answered HTTP {e.code}: "
                                      f"{_one_line(_error_message(body))}") from None
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut mid-answer
                last = _one_line(str(getattr(e, "reason", e)))
                continue
            except ValueError as e:  # a truncated / non-JSON body: the server died mid-answer
                last = f"bad answer ({_one_line(str(e))})"
                continue
        raise VLLMServerError(f"vLLM server {self.url}{path} unreachable after {self.retries + 1} attempts: {last}")

    # -- checks -----------------------------------------------------------------------------------------------

    def _check_model(self, expected: str | None, served_name: str | None) -> tuple[str, int | None]:
        models = self._request("/v1/models").get("data") or []
        if not models:
            raise VLLMServerError(f"vLLM server {self.url} serves no model")
        listing = ", ".join(f"{m.get('id')!r} (root {m.get('root')!r})" for m in models)
        if served_name is not None:
            match = [m for m in models if m.get("id") == served_name]
            if not match:
                raise VLLMServerError(f"vLLM server {self.url} does not serve {served_name!r}; it serves {listing}")
        elif expected is not None:
            match = [m for m in models if _same_model(expected, m)]
            if not match:
                raise VLLMServerError(
                    f"vLLM server {self.url} serves {listing}, not the job's model {expected!r}; start it with that "
                    "model, or name the served model explicitly (served_model_name / --server-model)"
                )
        else:
            if len(models) > 1:
                raise VLLMServerError(f"vLLM server {self.url} serves several models ({listing}); name one")
            match = models
        return match[0]["id"], match[0].get("max_model_len")

    def _check_tokenizer(self, tokenizer) -> None:
        if isinstance(tokenizer, (str, Path)):
            from .models import load_tokenizer

            tokenizer = load_tokenizer(str(tokenizer))
        probe = _PROBE[0]["content"]
        if getattr(tokenizer, "chat_template", None):
            probe = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True)
        ours = tokenizer(probe, add_special_tokens=False)["input_ids"]
        try:
            theirs = self._request("/tokenize", {"model": self.served, "prompt": probe, "add_special_tokens": False})
        except VLLMServerError as e:
            if "HTTP 404" in str(e):
                logger.warning("vLLM server %s has no /tokenize; the tokenizer is not checked", self.url)
                return
            raise
        if theirs.get("tokens") != ours:
            raise VLLMServerError(
                f"vLLM server {self.url} tokenizes differently from the job's tokenizer "
                f"({getattr(tokenizer, 'name_or_path', '?')}): a probe text gives {len(theirs.get('tokens') or [])} "
                f"tokens there, {len(ours)} here; serve the same tokenizer"
            )

    # -- contract ---------------------------------------------------------------------------------------------

    def _score_batch(self, seqs: list[tuple[list[int], int]]) -> list[list[float]]:
        payload = {"model": self.served, "prompt": [ids for ids, _ in seqs], "max_tokens": 1, "prompt_logprobs": 0,
                   "temperature": 0.0}
        answer = self._request("/v1/completions", payload)
        choices = sorted(answer.get("choices") or [], key=lambda c: c["index"])
        if len(choices) != len(seqs):
            raise VLLMServerError(f"vLLM server {self.url} answered {len(choices)} choices for {len(seqs)} prompts")
        out = []
        for (ids, n_prompt), choice in zip(seqs, choices):
            plp = choice.get("prompt_logprobs")
            if plp is None or len(plp) != len(ids):
                raise VLLMServerError(f"vLLM server {self.url} returned no prompt log-probs of the right length "
                                      "(is it a vLLM server?)")
            logps = []
            for t in scored_positions(ids, n_prompt):
                entries = {int(k): v["logprob"] for k, v in (plp[t] or {}).items()}
                logps.append(actual_logprob(entries, ids[t], t))
            out.append(logps)
        return out

    def score(self, rows, return_per_token: bool = False) -> dict[str, list]:
        from tqdm.auto import tqdm

        seqs = side_sequences(rows, self.max_length, self.truncation_mode)
        todo = [k for k, (ids, n_prompt) in enumerate(seqs) if len(scored_positions(ids, n_prompt))]
        if self.max_model_len is not None:
            for k in todo:
                if len(seqs[k][0]) + 1 > self.max_model_len:
                    raise VLLMServerError(
                        f"row {k // 2} has {len(seqs[k][0])} tokens but the server's max_model_len is "
                        f"{self.max_model_len}; set max_length or restart the server with --max-model-len "
                        f"{len(seqs[k][0]) + 1} or more"
                    )
        batches = [todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        per_seq: list[list[float] | None] = [None] * len(seqs)
        bar = tqdm(total=len(rows), unit="pair", desc="Scoring pairs (vLLM server)",
                   disable=not self.progress or not rows)
        need = [0] * len(rows)
        for k in todo:
            need[k // 2] += 1
        bar.update(need.count(0))  # rows with nothing to score
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = [pool.submit(self._score_batch, [seqs[k] for k in b]) for b in batches]
            try:
                for b, fut in zip(batches, futures):
                    for k, logps in zip(b, fut.result()):
                        per_seq[k] = logps
                        need[k // 2] -= 1
                        if need[k // 2] == 0:
                            bar.update(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        bar.close()
        return collect(len(rows), seqs, per_seq, return_per_token)


def _same_model(expected: str, served: dict) -> bool:
    """The served entry is the expected model: same name, or the same local folder."""
    from .models import resolve_model_path

    names = {served.get("id"), served.get("root")}
    if expected in names:
        return True
    try:
        path = Path(resolve_model_path(expected)).resolve()
    except Exception:  # noqa: BLE001 - e.g. the bundled model cannot be materialised here
        return False
    return any(n and Path(n).expanduser().resolve() == path for n in names)


def _error_message(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body
    err = data.get("error", data) if isinstance(data, dict) else data
    return err.get("message", str(err)) if isinstance(err, dict) else str(err)


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text[:300]
