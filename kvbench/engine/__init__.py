"""The engine: the KV cache, attention, the compression step, prefill capture and storage codecs.

It imports nothing above it: a method is anything with the members `protocol.Compressor` names."""
