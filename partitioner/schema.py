"""Column names shared by every stage (loader -> tokenizer -> scorer -> partitioner -> trainer).

TRL's own names are used where TRL reads the column (``prompt``/``chosen``/``rejected``, the token-id columns
``prompt_ids``/``chosen_ids``/``rejected_ids`` of TRL 1.x, and ``ref_chosen_logps``/``ref_rejected_logps``,
which TRL treats as precomputed reference log-probs). Our own columns never start with ``ref_``.
"""

ROW_ID = "row_id"  # content hash of the pair (see loading.pair_row_id); stable across reruns
SOURCE = "source"  # the input's tag (name given, or the file stem)
PROMPT, CHOSEN, REJECTED = "prompt", "chosen", "rejected"
CANONICAL = (PROMPT, CHOSEN, REJECTED)

# Tokenized exactly as TRL's DPOTrainer._prepare_dataset does (TRL 1.x names).
PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS = "prompt_ids", "chosen_ids", "rejected_ids"
TOKEN_COLUMNS = (PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS)
# True when DPOTrainer's collator will cut prompt+completion at max_length (keep_start): the scorer then sums
# only the tokens TRL keeps, and the row is flagged, never silently different.
CHOSEN_TRUNCATED, REJECTED_TRUNCATED = "chosen_truncated", "rejected_truncated"

# Scores of the reference model (sums over the completion tokens TRL keeps, as DPOTrainer computes them).
CHOSEN_LOGPS, REJECTED_LOGPS = "chosen_logps", "rejected_logps"
CHOSEN_TOKENS, REJECTED_TOKENS = "chosen_tokens", "rejected_tokens"

# TRL's precomputed reference columns: only written when handing a chunk to DPOTrainer.
TRL_REF_CHOSEN, TRL_REF_REJECTED = "ref_chosen_logps", "ref_rejected_logps"

# The difficulty the partitioner orders by: higher = harder. Each signal also keeps its own column.
DIFFICULTY = "difficulty"

# Rejects table (Arrow IPC stream file ``rejects.arrow``).
REJECT_COLUMNS = ("source", "row_index", "stage", "reason", "detail", "original")
