"""Profile service_layer (see services/profile/README.md)."""
