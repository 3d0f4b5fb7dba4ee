"""Training: one loop with hook points, metrics, checkpoints and torchrun DDP."""
