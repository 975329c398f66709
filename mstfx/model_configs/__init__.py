"""Hugging Face config.json files of the models ``mstfx simulate --model NAME`` knows (no downloads)."""
