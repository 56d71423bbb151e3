"""``python -m adlib``: see :mod:`adlib.cli`."""
from adlib.cli import main

raise SystemExit(main())
