"""`infir2 bench`: FP8 against BF16 (and any other variant) through the real launcher and training loop."""
