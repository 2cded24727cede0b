"""Site drivers behind one protocol."""
