"""The Ferry appliance."""
