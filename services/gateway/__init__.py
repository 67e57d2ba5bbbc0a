"""The HTTP/JSON gateway: every `google.api.http` annotation of the four services, transcoded to
its gRPC method, with an OpenAPI document generated from the same descriptors."""
