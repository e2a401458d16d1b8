import sys

from pyloader.cli import main

sys.exit(main())
