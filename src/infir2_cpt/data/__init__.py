"""`infir2 prepare-data` and `infir2 inspect-data`: raw corpora to Megatron indexed datasets, and a look inside one."""
