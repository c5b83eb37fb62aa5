"""uniner: open named-entity recognition by targeted distillation, run as Ray batch jobs."""

__version__ = "0.1.0"
