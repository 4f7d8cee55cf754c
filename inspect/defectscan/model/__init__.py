"""The defect segmentation model: TinyUNet, its losses and metrics, training, evaluation, export, registry."""
