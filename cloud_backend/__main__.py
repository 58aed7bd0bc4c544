"""`python -m cloud_backend serve`: run the cloud side of split training."""

from cloud_backend.cli import main

raise SystemExit(main())
