"""Ferry wire protocol."""
