"""One module per method: ``BASELINE_NAME``, ``DEFAULTS``, ``TINY`` and ``run_seed``
(see ``benchmarks/seeds/run.py``)."""
