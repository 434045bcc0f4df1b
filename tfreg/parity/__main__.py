import sys

from tfreg_harness.keras_side.cli import main

sys.exit(main())
