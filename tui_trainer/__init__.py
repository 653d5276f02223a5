"""tui-trainer: train GPT-2-style language models from a terminal."""

__version__ = "0.1.0"
