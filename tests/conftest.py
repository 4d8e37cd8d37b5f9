"""Shared pytest fixtures. Bench fixtures (Docker daemon, conda channel) live in their own modules."""
