"""Research studies, one command each (`autocompress study NAME`): questions about models and
hardware answered with measured numbers, a protocol beside every number, and figures.

Each study is one module with a settings dataclass and a ``run(loaded, settings, out, ...)``
function that writes its results (JSON, CSV, figures) in ``out`` as it goes, so a rerun with
``--resume`` continues where it stopped. Studies so far:

- ``fronts`` (fronts.py): the measured quality x memory x predicted-latency front of one model
  on several device profiles at once, and what the devices' plans differ in at equal memory.
"""
