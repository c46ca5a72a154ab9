"""Command-line tools built on reftrace (``python -m reftrace.tools.<name>``)."""
