"""QA's side of the learning loop: recording decisions, the review queue, reviewed images as training data."""
