"""Studies, one folder each (`experiments/README.md`); run as `python -m experiments.<study>.<module>`."""
