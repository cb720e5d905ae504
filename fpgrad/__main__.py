import sys

from fpgrad.cli import main

sys.exit(main())
