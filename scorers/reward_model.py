"""Scores of a sequence-classification reward model for the ``reward_model`` signal.

Each side is scored as the full conversation (chat template applied to ``prompt + chosen``) or, for standard
rows, as the text ``prompt + chosen``; the score is the first logit (TRL's RewardTrainer convention).
"""

from __future__ import annotations

from .packing import length_batches


class RewardModelScorer:
    """Batched reward-model scores of chosen and rejected.

    Raises:
        ModelLoadError: the model path does not exist or is not a sequence-classification model.
    """

    def __init__(self, path: str, dtype: str = "float32", device: str | None = None, batch_tokens: int = 4096,
                 max_length: int = 4096, progress: bool = True):
        import torch
        from transformers import AutoModelForSequenceClassification

        from .models import ModelLoadError, load_tokenizer, resolve_model_path

        self.tokenizer = load_tokenizer(path)
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                resolve_model_path(path), dtype=getattr(torch, dtype)
            ).eval()
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"could not load reward model {path!r}: {str(e).splitlines()[0]}") from e
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if device:
            self.model.to(device)
        self.device = device or "cpu"
        self.batch_tokens, self.max_length, self.progress = batch_tokens, max_length, progress

    def _ids(self, prompt, completion) -> list[int]:
        if isinstance(prompt, list):
            text = self.tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        else:
            text = prompt + completion
        return self.tokenizer(text, add_special_tokens=not isinstance(prompt, list))["input_ids"][: self.max_length]

    def score(self, rows: list[dict]) -> tuple[list[float], list[float]]:
        import torch

        seqs = [self._ids(r["prompt"], r[side]) for side in ("chosen", "rejected") for r in rows]
        scores = [0.0] * len(seqs)
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            for batch in length_batches([len(s) for s in seqs], self.batch_tokens):
                width = max(len(seqs[i]) for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for j, i in enumerate(batch):
                    ids[j, : len(seqs[i])] = torch.tensor(seqs[i])
                    mask[j, : len(seqs[i])] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                for j, i in enumerate(batch):
                    scores[i] = float(logits[j, 0])
        n = len(rows)
        return scores[:n], scores[n:]

    def close(self):
        self.model = None
