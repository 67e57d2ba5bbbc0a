"""Thin gRPC servicers: protobuf in, domain calls, protobuf out."""
