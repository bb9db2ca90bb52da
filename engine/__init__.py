"""The run: the runner, the Trainer that owns the run state, the loops, metrics and stop signals."""
