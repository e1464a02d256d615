"""Reporting: tables (and, later, plots and report files) from results only."""

from prunekit.report.tables import format_table

__all__ = ["format_table"]
