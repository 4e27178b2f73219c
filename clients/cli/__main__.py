import sys

from idealrt.clients.cli import main

sys.exit(main())
