"""Ferry clients: SDK, CLI and heartbeat monitor."""
