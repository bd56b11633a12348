"""The report: metrics.json views, plots and markdown/HTML rendering, built from saved files only."""
