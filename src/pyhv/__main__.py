import sys

from pyhv.cli import main

sys.exit(main())
