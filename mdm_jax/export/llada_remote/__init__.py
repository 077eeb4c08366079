"""Hugging Face remote code shipped inside every `llada-hf` export (copied next to its weights;
`auto_map` in its config.json points at these files). Standalone: torch and transformers only."""
