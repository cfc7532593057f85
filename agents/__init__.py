"""Placeholder package; its experiments arrive with later issues."""
