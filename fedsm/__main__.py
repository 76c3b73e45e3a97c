"""``python -m fedsm`` is the ``fedsm`` command."""

from fedsm.cli import main

raise SystemExit(main())
