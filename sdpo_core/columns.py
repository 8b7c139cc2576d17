"""Column names and constants shared by every stage (loader -> tokenizer -> scorer -> partitioner -> trainer).

One place for each: the other packages import these names, never spell them out.

TRL's own names are used where TRL reads the column (``prompt``/``chosen``/``rejected``, the token-id columns
``prompt_ids``/``chosen_ids``/``rejected_ids`` of TRL 1.x, and ``ref_chosen_logps``/``ref_rejected_logps``,
which TRL treats as precomputed reference log-probs). Our own columns never start with ``ref_``.
"""

from enum import StrEnum

ROW_ID = "row_id"  # content hash of the pair (see partitioner.data.loading.pair_content_hash); stable across reruns
SOURCE = "source"  # the input's tag (name given, or the file stem)
PROMPT, CHOSEN, REJECTED = "prompt", "chosen", "rejected"
CANONICAL = (PROMPT, CHOSEN, REJECTED)

# Tokenized exactly as TRL's DPOTrainer._prepare_dataset does (TRL 1.x names).
PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS = "prompt_ids", "chosen_ids", "rejected_ids"
TOKEN_COLUMNS = (PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS)
# True when DPOTrainer's collator will cut prompt+completion at max_length: the scorer then sums only the tokens
# TRL keeps, and the row is flagged, never silently different.
CHOSEN_TRUNCATED, REJECTED_TRUNCATED = "chosen_truncated", "rejected_truncated"

# Scores of the reference model (sums over the completion tokens TRL keeps, as DPOTrainer computes them).
CHOSEN_LOGPS, REJECTED_LOGPS = "chosen_logps", "rejected_logps"
CHOSEN_TOKENS, REJECTED_TOKENS = "chosen_tokens", "rejected_tokens"

# M0's summed log-probs of the prompt's own tokens (each predicted from the ones before it; the first token has no
# predictor) and how many were scored: only written when the prompt_perplexity signal asks for them.
PROMPT_LOGPS, PROMPT_TOKENS = "prompt_logps", "prompt_tokens"

# Intermediate columns of the signals that need another model.
POLICY_CHOSEN_LOGPS, POLICY_REJECTED_LOGPS = "policy_chosen_logps", "policy_rejected_logps"
REWARD_CHOSEN, REWARD_REJECTED = "reward_chosen", "reward_rejected"

# TRL's precomputed reference columns: only written when handing a chunk to DPOTrainer.
TRL_REF_CHOSEN, TRL_REF_REJECTED = "ref_chosen_logps", "ref_rejected_logps"

# The difficulty the partitioner orders by: higher = harder. Each signal also keeps its own column.
DIFFICULTY = "difficulty"


class Direction(StrEnum):
    """Which way a signal's values point, as scoring.json and the partition manifest record it (the value's text).

    A ``StrEnum``, so a direction read back from JSON compares equal to its member.
    """

    HIGHER_IS_EASIER = "higher_is_easier"
    HIGHER_IS_HARDER = "higher_is_harder"  # the direction of ``difficulty``


# Settings shared by every stage that tokenizes, scores or trains.
TRUNCATION_MODES = ("keep_start", "keep_end")  # DPOConfig.truncation_mode
DTYPES = ("float32", "bfloat16", "float16")
