"""Distributed batch inspection: plan shards, run the model on workers, record results."""
