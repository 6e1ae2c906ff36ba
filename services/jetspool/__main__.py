from jetspool.cli import main

raise SystemExit(main())
