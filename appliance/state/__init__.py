"""Durable state in Redis: commands, migrations, checkpoints, leases, events, heartbeats."""
