"""meter-grpc: metered software licenses over gRPC."""
