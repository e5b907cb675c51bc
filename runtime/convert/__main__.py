"""``python -m runtime.convert``: see :mod:`runtime.convert`."""
from runtime.convert.cli import main

raise SystemExit(main())
