"""Tensor parallelism: the process group of one server's ranks (see parallel_state)."""
