from ._cluster_memory import ClusterMemory  # noqa: F401
