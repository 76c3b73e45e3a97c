"""Audit tools: replay, verify and report a run from its log alone. They never write to what
they read."""
