"""Run logs: recorded training runs in memory (`Run`, `RunSet`) and on disk (Parquet + JSON)."""

from simfluence.runlog.gptfluence import export_gptfluence, import_gptfluence
from simfluence.runlog.runs import Curriculum, Run, RunSet, count_matrix, normalize_curriculum
from simfluence.runlog.store import (
    load_runset,
    read_manifest,
    save_runset,
    write_manifest,
    write_run,
)

__all__ = [
    "Curriculum",
    "Run",
    "RunSet",
    "count_matrix",
    "export_gptfluence",
    "import_gptfluence",
    "load_runset",
    "normalize_curriculum",
    "read_manifest",
    "save_runset",
    "write_manifest",
    "write_run",
]
