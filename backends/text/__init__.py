"""The text side of a model: chat templates (``prompting``), tool calls (``tools``), constrained decoding
(``grammar``) and output cleaning (``cleaning``)."""
