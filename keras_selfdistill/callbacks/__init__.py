"""Callbacks that `Distiller.fit` adds for its own epoch-level events."""
