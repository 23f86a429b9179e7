"""genrpc: LLM text generation served over gRPC by three services.

The generated protobuf modules live in `genrpc.v1` (built by `make stubs`).
"""
