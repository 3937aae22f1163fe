"""The `simfluence` command line. It uses the library; the library never imports it."""

from simfluence.cli.main import main, run

__all__ = ["main", "run"]
