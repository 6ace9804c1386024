"""The gRPC edge: servicers and the error table."""
