"""Run folders: append-only records and resume (``runs``), shards and merges, model and dataset cards, Hub uploads."""
