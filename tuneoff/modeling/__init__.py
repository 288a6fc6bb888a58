"""The models: import the base, quantize it to NF4, build each method's trainable model, merge adapters."""
