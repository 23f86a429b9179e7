"""The tokenizer service: encode (chat template, truncation, left padding, attention mask), decode,
and stateless incremental detokenization."""
