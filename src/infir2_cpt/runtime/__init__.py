"""What runs inside torchrun or a GPU worker process, not on the launch host's planning path: torchrun with a
graceful stop and the rendezvous wait, the training and conversion entries that torchrun starts, and the
workarounds they apply to the megatron-core wheel before Megatron starts."""
