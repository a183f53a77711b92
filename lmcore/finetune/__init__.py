"""Fine-tuning: classification head, instruction following, DPO, LoRA."""
