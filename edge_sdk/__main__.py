"""`python -m edge_sdk`: the device-side command line."""

from edge_sdk.cli import main

raise SystemExit(main())
