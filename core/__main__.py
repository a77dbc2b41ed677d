"""`python -m core` is the `archkit` command."""

from .cli import main

raise SystemExit(main())
