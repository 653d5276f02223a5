"""Bridges to other training frameworks: hf (a transformers.Trainer callback). Never imports textual."""
