"""End-to-end pipelines and experiments built on stream_swav (run from a checkout; not installed)."""
