"""One rank of a training run: the trainer's loop, the DeepSpeed engine it drives, and what a step logs."""
