"""Internal protocols: the tokenizer and model services, which only the gateway calls."""
