"""The benchmarks of ``treepo bench``: one module per benchmark (``add_arguments(parser)``, ``run(args)``),
each comparing against a baseline measured in the same run; :mod:`cluster.bench.report` prints them."""
