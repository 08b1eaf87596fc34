"""``python -m deals_pipeline.simulator`` runs the simulator CLI."""

import sys

from deals_pipeline.simulator.cli import main

if __name__ == "__main__":
    sys.exit(main())
