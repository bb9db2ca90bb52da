"""Distributed plumbing: the process group, DDP / ZeRO / FSDP wrapping, the per-process memory estimate."""
