"""Orbax checkpoints (save/restore/resharding) and, later, format converters."""
