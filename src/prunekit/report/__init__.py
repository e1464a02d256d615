"""Reporting: tables (and, later, plots and report files) from results only; the console log of summaries."""

from prunekit.report.console import console_summaries
from prunekit.report.tables import format_table

__all__ = ["console_summaries", "format_table"]
