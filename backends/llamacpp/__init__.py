"""The ``llamacpp`` backend: the model (``model``), its engine (``engine``) and samplers (``sampling``)."""
