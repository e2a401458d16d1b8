"""From ring-buffer records to access-log records: decoding into a record,
then the stages that enrich and rewrite it (stages.py lists them in order)."""
