"""Training: the train state, losses, the jitted step, checkpoints, run control and logs."""
