"""The sweep tool: a config over a grid of overrides (`python -m experiments.sweep --help`)."""
