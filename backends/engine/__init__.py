"""What both batching engines share: the engine thread and a request's life (``loop``), slots and requests
(``slots``)."""
