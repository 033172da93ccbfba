"""Reading what users hand the engine and writing what it produces: limits, JSONL, atomic outputs, shipped data."""
