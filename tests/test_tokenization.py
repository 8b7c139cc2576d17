"""Our token ids equal the ids TRL's own DPOTrainer produces, on the real data with the SmolLM2 tokenizer."""

from __future__ import annotations

import pytest

from partitioner.data.loading import load_preferences, load_preferences_with_rejects
from partitioner.data.tokenization import TokenizationError, TokenizeConfig, tokenize_preferences
from sdpo_core.columns import CHOSEN_IDS, CHOSEN_TRUNCATED, PROMPT_IDS, REJECTED_IDS, ROW_ID

FILES = {
    "orca": "orca_dpo_pairs/validation.jsonl",
    "llamafactory_en": "llamafactory_demo/dpo_en_demo.json",
    "llamafactory_zh": "llamafactory_demo/dpo_zh_demo.json",
}


def trl_prepared(dataset, tokenizer, model_dir, tmp_path, max_length):
    """The train dataset exactly as a real DPOTrainer prepares it."""
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True, report_to=[], max_length=max_length,
        gradient_checkpointing=False,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return trainer.train_dataset


@pytest.mark.parametrize("name", list(FILES))
def test_token_ids_equal_dpotrainer(name, shared_data, smollm2_tokenizer, tiny_model_dir, tmp_path):
    max_length = 1024
    loaded = load_preferences({name: shared_data / FILES[name]})
    ours, rejects = tokenize_preferences(loaded, smollm2_tokenizer, TokenizeConfig(max_length=max_length))
    # TRL sees only TRL's columns (plus row_id to align rows after its silent filter).
    theirs = trl_prepared(
        loaded.select_columns(["prompt", "chosen", "rejected", ROW_ID]), smollm2_tokenizer, tiny_model_dir,
        tmp_path, max_length,
    )
    # Rows TRL drops (prompt alone fills max_length) are exactly our prompt_too_long rejects.
    assert len(theirs) == len(ours)
    assert len(ours) + len(rejects) == len(loaded)
    assert all(r["reason"] == "prompt_too_long" for r in rejects)
    assert theirs[ROW_ID] == ours[ROW_ID]
    for col in (PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS):
        assert theirs[col] == ours[col], col
    if name == "orca":
        # Measured: 9 of the 284 orca rows have prompts of >= 1024 tokens.
        assert len(rejects) == 9
    # Truncation flags agree with the collator's cut.
    for p, c, flag in zip(ours[PROMPT_IDS], ours[CHOSEN_IDS], ours[CHOSEN_TRUNCATED]):
        assert flag == (len(p) + len(c) > max_length)


def test_standard_text_rows_get_eos_like_trl(smollm2_tokenizer, tiny_model_dir, tmp_path):
    rows = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": "Two plus two is", "chosen": " four." + smollm2_tokenizer.eos_token, "rejected": " five."},
        {"prompt": "Water boils at", "chosen": " 100 C.", "rejected": " 50 C."},
    ]
    loaded, _ = load_preferences_with_rejects(rows)
    ours, rejects = tokenize_preferences(loaded, smollm2_tokenizer, TokenizeConfig(max_length=None))
    theirs = trl_prepared(loaded.select_columns(["prompt", "chosen", "rejected"]), smollm2_tokenizer, tiny_model_dir,
                          tmp_path, None)
    assert not rejects
    for col in (PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS):
        assert theirs[col] == ours[col]
    assert all(ids[-1] == smollm2_tokenizer.eos_token_id for ids in ours[CHOSEN_IDS])


def test_conversational_data_needs_a_chat_template(shared_data, smollm2_tokenizer):
    tok = smollm2_tokenizer.__class__.from_pretrained(smollm2_tokenizer.name_or_path)
    tok.chat_template = None
    loaded = load_preferences(shared_data / FILES["orca"]).select(range(3))
    with pytest.raises(TokenizationError, match="no chat template"):
        tokenize_preferences(loaded, tok)
