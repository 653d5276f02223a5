"""The torch world: data, model, checkpoints and the training loop. Never imports textual."""
