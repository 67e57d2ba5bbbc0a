"""service_layer of the risk service."""
