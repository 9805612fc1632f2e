"""``python -m agentsd``: the command line, where the ``agentsd`` script is not installed."""

from .cli import main

raise SystemExit(main())
