"""The `infir2` command line (entry point `infir2_cpt.cli:main`)."""

from .app import app, main

__all__ = ["app", "main"]
