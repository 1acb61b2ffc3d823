"""Checkpoint files and parameter names: one reader or writer per format, the declarative rule engine, one rule
table per family, and the one streaming, strict way weights reach a Cell (``load``)."""
