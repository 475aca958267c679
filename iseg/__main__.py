"""``python -m iseg``: the ``iseg`` command line (:mod:`iseg.cli`)."""

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while Python imports: no traceback
    import sys

    print("iseg: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
