"""``python -m st_mamba VERB ...`` is the ``st-mamba`` command."""

from st_mamba.cli import main

raise SystemExit(main())
