"""What infir2 reads back from a run: the learning-rate curve, the checkpoint table, Megatron's console log."""
