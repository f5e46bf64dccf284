"""gRPC servicers: convert the request, call the domain, convert the answer."""
