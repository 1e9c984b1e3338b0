"""The training runtime: model, data, loss, optimizer, trainer, metrics, checkpoints."""
