"""Recipes: the typed schema, loading (shipped names, `extends:`, `--set`), the configuration rules, the model
shape and the learning-rate schedule. Pure: nothing here touches a GPU, a process or the experiment folders."""
