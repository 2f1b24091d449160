"""Memory-bank variants of the seed methods (hybrid, dynamic, multi-centre, instance, soft targets) over the ops."""
