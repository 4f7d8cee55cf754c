"""Where and when an image set was taken: the one list of its provenance fields.

Each label is a column of `image_sets`, an attribute of a store's group, an option of `ingest` and
`imagesets register`, and a filter of the listing commands; the capture time (`acquired_at`, ISO 8601,
UTC unless given) is the fifth fact, kept per image as well.
"""

LABELS = ("lot", "line", "product", "camera")
TIME = "acquired_at"
# What each label names, for help texts.
MEANING = {"lot": "lot", "line": "production line", "product": "product", "camera": "camera"}
