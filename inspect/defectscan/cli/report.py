"""`defectscan report`: QA reports in HTML and PDF (lands with the reports issue)."""

from defectscan.cli.app import not_yet_available

report = not_yet_available("report", "Write a QA report for a lot, a line and period, or a job run.", "defectscan report --lot L042 -o L042.html")
