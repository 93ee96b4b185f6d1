"""``distill finetune``: a model directory fine-tuned on a labelled task and scored on its test split."""
