"""``python -m simfluence``: the command line."""

import sys

from simfluence.cli.main import main

sys.exit(main())
