"""infir2: FP8 continual pre-training of Qwen2.5 on Megatron."""

__version__ = "0.1.0"
