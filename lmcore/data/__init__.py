"""Data stages: collect raw sources, clean them into documents, token shards and batches."""
