"""`infir2 convert`: the HF <-> Megatron tensor mapping and the checks made on the CPU before the one
conversion process (runtime/convert_entry.py) is started."""
