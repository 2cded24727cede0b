"""From a raw queue delivery to an answered command: validate, authenticate, record, route."""
