"""Training: optimiser & schedule, DeepSpeed glue, checkpoints, the trainer loop."""
