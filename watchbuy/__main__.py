from watchbuy.cli import main

raise SystemExit(main())
