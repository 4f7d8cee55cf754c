"""`defectscan defects | images | lots`: query inspection results (lands with the queries issue)."""

from defectscan.cli.app import not_yet_available

defects = not_yet_available("defects", "List and show detected defects.", "defectscan defects list --lot L042 --limit 20")
images = not_yet_available("images", "List and show inspected images.", "defectscan images show 17 --overlay out.png")
lots = not_yet_available("lots", "Summaries of lots: images, failures, defect rate.", "defectscan lots show L042")
