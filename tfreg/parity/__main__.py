import sys

from tfreg.parity.cli import main

sys.exit(main())
