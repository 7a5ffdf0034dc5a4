"""`python -m experiments.sweep ...`: the sweep tool (see `experiments.sweep.sweep`)."""

from experiments.sweep import sweep

if __name__ == "__main__":
    sweep.main()
