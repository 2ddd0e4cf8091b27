"""Command-line tools and offline checkpoint helpers (``python -m bcr_jax.tools.<name>``)."""
