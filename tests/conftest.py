"""Shared test set-up: hypothesis profiles (``ci`` bounded and derandomized, ``dev`` wider,
``deep`` for ``make test-deep``)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=300, deadline=None)
# `make test-deep`: long searches, for before a release or after touching the core.
settings.register_profile(
    "deep",
    max_examples=3000,
    stateful_step_count=100,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


#: Test files that take the longest (real brokers, node processes, demos), slowest first.
#: ``make test`` runs two workers with one file per worker (``--dist loadfile``) and hands out
#: files in collection order: starting with the long ones keeps a long file from starting
#: last while the other worker sits idle (longest-first scheduling).
LONG_FILES = (
    "test_kill_points.py",
    "test_reliability_mqtt.py",
    "test_demo_options.py",
    "test_demo.py",
    "test_no_pickle.py",
    "test_transport_mqtt.py",
    "test_witness_end_to_end.py",
    "test_readme_contracts.py",
    "test_readme_example.py",
    "test_node_operator.py",
    "test_testing_logreader.py",
    "test_lifecycle.py",
    "test_protocol_stateful.py",
    "test_strategies_jobs.py",
    "test_node_cli.py",
    "test_scale.py",
    "test_node_hosts.py",
    "test_perf_pool.py",
    "test_reliability_disk.py",
)


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ARG001 - pytest's signature
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
