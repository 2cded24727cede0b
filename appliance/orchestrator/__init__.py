"""Migrations as persisted state machines: requests, scheduling, workflows, leases."""
