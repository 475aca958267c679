"""``python -m iseg``: the ``iseg`` command line (:mod:`iseg.cli`)."""

from .cli import main

raise SystemExit(main())
