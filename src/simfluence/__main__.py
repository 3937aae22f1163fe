"""``python -m simfluence``: the command line."""

from simfluence.cli.main import run

run()
