"""Adapters that let other agent frameworks use sandbox-actors pools as their sandboxes."""
