"""Checkpoint files and folders: writing, finding, reading, sharded (DCP) checkpoints."""
