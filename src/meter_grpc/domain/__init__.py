"""Licensing rules as plain Python: no gRPC, protobuf or Redis here."""
