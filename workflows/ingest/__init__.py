"""Ingest source trees (MVTec AD, MPDD, BTAD, VisA, generic folders) into the Parquet dataset format."""

from workflows.ingest.layouts import LAYOUTS, SourceItem, scan_source
from workflows.ingest.quarantine import Problem, QuarantineReport
from workflows.ingest.run import IngestOptions, IngestResult, StrictIngestError, ingest

__all__ = [
    "LAYOUTS", "IngestOptions", "IngestResult", "Problem", "QuarantineReport", "SourceItem",
    "StrictIngestError", "ingest", "scan_source",
]
