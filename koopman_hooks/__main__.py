import sys

from koopman_hooks.cli import main

sys.exit(main())
