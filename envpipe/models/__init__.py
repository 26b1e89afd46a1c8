"""Model builders for pipeline training (torch/transformers are imported on demand, never at import time)."""
