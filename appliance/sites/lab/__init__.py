"""The lab site: files on disk, the embedded default and what tests use."""
