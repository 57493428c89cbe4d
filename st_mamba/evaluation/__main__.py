from st_mamba.evaluation.cli import main

raise SystemExit(main())
