"""`lorafit serve`: one base model, many adapters, mixed requests batched into one forward (issue 14)."""
