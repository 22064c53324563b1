"""Loading base models and tokenizers (the embedded SmolLM2 included), and completion-only forward passes."""
