"""On the launch host: from a request to a checked plan, then the experiment lock and the exec of torchrun; and
`infir2 sbatch`, which plans the same launch for a Slurm allocation."""
