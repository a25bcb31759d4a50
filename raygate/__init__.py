"""The `raygate` command: the one place that wires models, serve and gateway together."""
