import sys

from ganspect.edge.cli import main

sys.exit(main())
