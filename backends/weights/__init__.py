"""Weights: finding and fetching them (``files``), a load's progress (``progress``), hub credentials
(``credentials``), and GGUF files converted once for transformers (``convert_cache``)."""
