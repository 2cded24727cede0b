"""Block storage: extents, the narrow backend interface, and its implementations."""
