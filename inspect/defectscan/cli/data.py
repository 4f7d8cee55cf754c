"""`defectscan data`: datasets for training and tests (lands with the model issue)."""

from defectscan.cli.app import not_yet_available

data = not_yet_available("data", "Generate and check training datasets.", "defectscan data synth out/dagm --classes 3")
