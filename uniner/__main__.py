import sys

from uniner.cli import main

sys.exit(main())
