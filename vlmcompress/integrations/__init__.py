"""Hooks that plug vlmcompress into other tools (lmms-eval)."""
