"""The train-step benchmark's parts, one job per module (the CLI is `experiments/benchmark/benchmark.py`).

* `settings`: setting names (``constant``, ``row``, ``row_subset``, ``batch`` plus ``+``
  modifiers), workloads (input shapes, synthetic batches) and the models they build.
* `transformer`: the transformer MLP stack workload (a Flax module over
  `sdjax.layers.DropPathResidual`).
* `macs`: analytic multiply-accumulates per residual block; ideal and realized kept compute.
* `timing`: compiles and times the package's train step (`sdjax.steps.train_step`).
* `torch_peer`: times the PyTorch eager peer (`experiments/reference/torch_models.py`).
* `analysis`: ratios between settings and frameworks, and the targets met / missed.
* `report`: the markdown report.
"""
