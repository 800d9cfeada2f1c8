"""`python -m controller.hnvctl ...`: the console script, as a module."""

from controller.hnvctl.cli import main

raise SystemExit(main())
