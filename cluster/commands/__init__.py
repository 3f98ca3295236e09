"""The ``treepo`` subcommands: one module per command, each with ``add_arguments(parser)`` and
``run(args) -> int``. They compose the pipeline, the local driver and the benchmarks; nothing imports them
but :mod:`cluster.cli`."""
