"""Aggregation strategies: what each node gets for a round and how replies become the next
global parameters."""

from fedsm.strategies.fedavg import AggregationError, FedAvg

__all__ = ["AggregationError", "FedAvg"]
