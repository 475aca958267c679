"""The ``iseg`` subcommands, one module each; :mod:`iseg.cli` dispatches to them.

How to add a subcommand ``NAME``:

1. Write ``iseg/commands/NAME.py`` (``refine-masks`` → ``refine_masks.py``) with

   * ``add_parser(subparsers) -> None``: ``subparsers.add_parser("NAME", help=...,
     description=...)`` and its options. Module-level imports stdlib-only (``iseg --help``
     must not import torch: this is why every command imports inside its functions); use the shared option adders (:mod:`._model`'s
     ``add_model_options``: ``--model/--device/--dtype``; :mod:`._common`'s
     ``add_output_options``: ``--out/--batch-size/--overwrite``) and the value types of
     :mod:`._common` (``positive_int``, ``seed``, …); inputs and outputs are :mod:`._io`.
   * ``run(args) -> int``: the exit status: parse, call one library function, render. Import
     torch and the pipeline inside. Raise :class:`._common.CommandError` (``code=2`` for
     usage errors) for a failure; the library raises :class:`iseg.errors.RunError`: the
     dispatcher prints either as one ``iseg: error: ...`` line. Check everything that can fail
     (inputs with ``expand_inputs``/``check_images``, ``resolve_device``,
     ``check_ops_backend``, ``Runner.plan``) *before* ``load_pipeline``, and create nothing
     on disk before the model has loaded.

2. Add one line ``"NAME"`` (the module name) to ``COMMANDS`` in :mod:`iseg.cli`.

A subcommand that writes results per input uses :class:`iseg.runner.Runner` (resume, atomic
writes, per-input failures, progress; its docstring has the pattern, and :mod:`.segment` is the
full example) over the store that fits: files per input with a manifest (``Runner(out, ...)``),
one lines file (:mod:`.tag`), files done when present (``iseg data``), or eval's predictions. If it writes names other than ``*_labels.png`` /
``*_overlay.png|jpg``, add their endings to ``_io.OUTPUT_SUFFIXES`` so that folder and glob
inputs skip them. Tests go through ``iseg.cli.main([...])``.
"""
