"""`defectscan train | evaluate | models` (lands with the model issue)."""

from defectscan.cli.app import not_yet_available

train = not_yet_available("train", "Train a TinyUNet defect model.", "defectscan train configs/model/tinyunet-dagm.yaml --data out/dagm")
evaluate = not_yet_available("evaluate", "Evaluate a model on a dataset.", "defectscan evaluate model.keras --data out/dagm")
models = not_yet_available("models", "Register, list and show model versions.", "defectscan models list")
