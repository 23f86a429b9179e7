"""The gateway: the public genrpc.v1.Generation API, coordinating tokenizer and model services."""
