"""QA reports: aggregations as charts and tables in one self-contained HTML file, and its PDF."""
