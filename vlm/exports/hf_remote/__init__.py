"""Self-contained transformers code that `format=hf` copies into an export folder when no stock class fits (loaded
with `trust_remote_code=True`). These files import transformers, timm and torch only, never `vlm`."""
