"""The ``huggingface_local`` backend: the model (``model``), its engine (``engine``) and the small-batch matrix
products it tunes at load (``cpu_linear``)."""
