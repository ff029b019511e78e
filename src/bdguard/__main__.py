from bdguard.cli.main import main

raise SystemExit(main())
