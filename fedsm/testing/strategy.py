"""The contract every aggregation strategy of fedsm keeps, as property-based tests.

A strategy (an :class:`~fedsm.strategies.fedavg.Aggregator`: ``name``,
``create_aggregator_args``, ``aggregate_files``, ``state``/``load_state``) is run by a Job,
by a restored Job and by the audit (``fedsm replay --verify --repo``), and all three must
get the same bytes. The Job aggregates a round's replies in sorted node order, a restored
Job builds a fresh strategy, and the audit aggregates again the reply files it fetched from
the repository by digest (other paths, same bytes). So a strategy must be:

- **order independent**: the same replies given in any order give the same file (sha256);
  and relabelling the nodes (the same files, weights, but which node sent which one
  permuted) changes nothing either, unless the strategy declares ``node_symmetric = False``
  (it keeps per-node memory, e.g. Scaffold's corrections);
- **deterministic**: the same inputs twice give the same file;
- **restorable**: a new instance from :meth:`StrategyContract.make_strategy` (loaded with
  the live one's :meth:`state`, as a restored job would build it) gives what the live
  instance, which already aggregated an earlier round, gives;
- **recomputable**: the reply files stored in a repository and fetched back by digest
  aggregate to the recorded digest (a strategy named ``fedavg`` must moreover agree with
  the audit's own :class:`~fedsm.strategies.fedavg.FedAvg`, which is what the audit runs);
- **pure in its arguments**: ``create_aggregator_args`` with the same arguments twice gives
  the same result, its message values are JSON-like, its files the same bytes.

Usage::

    class TestMyStrategy(StrategyContract):
        __test__ = True

        def make_strategy(self):
            return MyStrategy()

Tensors are drawn as small dyadic numbers (multiples of 1/8) and weights as integers, so
that every weighted sum is exact in float64: a strategy that sums in another order than
FedAvg's still gets the same bits, and a difference found is a real dependence on order.
A failure names the property broken and shows hypothesis' smallest counterexample.

Hypothesis settings: the loaded profile's, with ``max_examples`` bounded by the class
attribute of that name, except under a profile listed in ``unbounded_profiles`` (``deep``,
for ``make test-deep``), whose values are used as they are.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

__all__ = ["StrategyContract", "replies"]

#: The model every reply is a set of parameters of, unless a subclass sets ``model_shapes``.
DEFAULT_SHAPES: dict[str, tuple[int, ...]] = {"bias": (3,), "weight": (3, 2)}

NODE_NAMES = ("node-a", "node-b", "node-c", "node-d", "node-e", "node-f")


def _tensors(shapes: Mapping[str, tuple[int, ...]]) -> st.SearchStrategy[dict[str, Any]]:
    """Float32 tensors of ``shapes`` whose values are multiples of 1/8 in [-128, 128]."""
    import torch

    def tensor(shape: tuple[int, ...]) -> st.SearchStrategy[Any]:
        size = math.prod(shape)
        return st.lists(st.integers(-1024, 1024), min_size=size, max_size=size).map(
            lambda values: torch.tensor([v / 8 for v in values], dtype=torch.float32).reshape(shape)
        )

    return st.fixed_dictionaries({name: tensor(shape) for name, shape in sorted(shapes.items())})


def replies(
    shapes: Mapping[str, tuple[int, ...]] = DEFAULT_SHAPES,
    *,
    min_nodes: int = 1,
    max_nodes: int = 4,
) -> st.SearchStrategy[list[tuple[str, dict[str, Any], float]]]:
    """One round's replies: ``[(node_id, tensors, weight)]`` in sorted node order, distinct
    nodes, positive integer weights (sample counts)."""
    return st.lists(
        st.tuples(
            st.sampled_from(NODE_NAMES),
            _tensors(shapes),
            st.integers(1, 1000).map(float),
        ),
        min_size=min_nodes,
        max_size=max_nodes,
        unique_by=lambda reply: reply[0],
    ).map(lambda items: sorted(items, key=lambda reply: reply[0]))


def _json_like(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_json_like(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _json_like(v) for k, v in value.items())
    return False


def _short(sha: str) -> str:
    return sha[:12]


class StrategyContract:
    """Property tests every aggregation strategy passes; subclass, set ``__test__ = True``
    and implement :meth:`make_strategy`."""

    __test__ = False

    #: The model's parameters: name -> shape (float32).
    model_shapes: Mapping[str, tuple[int, ...]] = DEFAULT_SHAPES
    #: Largest number of replies in a round.
    max_nodes: int = 4
    #: False for a strategy that treats nodes differently by id (per-node memory): the
    #: relabelling property is then skipped.
    node_symmetric: bool = True
    #: Bound on examples per property, for everyday runs (see the module's docstring).
    max_examples: int = 25
    #: Profiles whose settings are used unbounded.
    unbounded_profiles: tuple[str, ...] = ("deep",)

    def make_strategy(self) -> Any:
        """A new strategy, configured as the job under test would build it."""
        raise NotImplementedError("a StrategyContract subclass implements make_strategy()")

    # ------------------------------------------------------------------ machinery

    def hypothesis_settings(self) -> settings:
        """The settings each property runs under (read when it runs, so the loaded profile
        counts)."""
        parent = settings.default
        bounded = settings.get_current_profile_name() not in self.unbounded_profiles
        return settings(
            parent,
            max_examples=min(parent.max_examples, self.max_examples)
            if bounded
            else parent.max_examples,
            deadline=None,
            suppress_health_check=[
                *parent.suppress_health_check,
                HealthCheck.too_slow,
                HealthCheck.differing_executors,
            ],
        )

    def _run(self, check: Callable[..., None], *strategies: st.SearchStrategy[Any]) -> None:
        test = given(*strategies)(check)
        settings(self.hypothesis_settings())(test)()

    def _replies(self) -> st.SearchStrategy[list[tuple[str, dict[str, Any], float]]]:
        return replies(self.model_shapes, max_nodes=self.max_nodes)

    @staticmethod
    def _write(
        directory: Path, replies_: Sequence[tuple[str, Mapping[str, Any], float]]
    ) -> list[tuple[str, Path, float]]:
        from fedsm.training.params import save_params

        directory.mkdir(parents=True, exist_ok=True)
        items = []
        for node, tensors, weight in replies_:
            path = directory / f"{node}.safetensors"
            save_params(path, tensors)
            items.append((node, path, weight))
        return items

    @staticmethod
    def _aggregate(strategy: Any, items: Sequence[tuple[str, Path, float]], out: Path) -> str:
        sha = strategy.aggregate_files(list(items), out)
        from fedsm.digests import sha256_file

        on_disk = sha256_file(out)
        assert sha == on_disk, (
            f"{type(strategy).__name__}.aggregate_files returned sha256 {_short(sha)} but wrote "
            f"a file hashing to {_short(on_disk)}"
        )
        return sha

    @staticmethod
    def _scratch() -> tempfile.TemporaryDirectory[str]:
        return tempfile.TemporaryDirectory(prefix="fedsm-strategy-contract-")

    @staticmethod
    def _describe(items: Sequence[tuple[str, Path, float]]) -> str:
        return "[" + ", ".join(f"({n}, {p.name}, {w:g})" for n, p, w in items) + "]"

    # ------------------------------------------------------------------ the properties

    def test_order_of_items_does_not_matter(self) -> None:
        """The replies in any order (as they arrive) give the same aggregate."""

        def check(data: st.DataObject) -> None:
            replies_ = data.draw(self._replies(), label="replies")
            permutation = data.draw(st.permutations(range(len(replies_))), label="order")
            with self._scratch() as tmp:
                root = Path(tmp)
                items = self._write(root / "replies", replies_)
                shuffled = [items[i] for i in permutation]
                sorted_sha = self._aggregate(self.make_strategy(), items, root / "a.safetensors")
                shuffled_sha = self._aggregate(
                    self.make_strategy(), shuffled, root / "b.safetensors"
                )
                assert sorted_sha == shuffled_sha, (
                    "the aggregate depends on the order of the replies (fedsm aggregates in "
                    "sorted node order; the audit and a restored job must get the same bytes): "
                    f"items {self._describe(items)} give {_short(sorted_sha)}, in the order "
                    f"{self._describe(shuffled)} they give {_short(shuffled_sha)}"
                )

        self._run(check, st.data())

    def test_which_node_sent_which_file_does_not_matter(self) -> None:
        """The same files and weights under permuted node ids give the same aggregate."""
        if not self.node_symmetric:
            return

        def check(data: st.DataObject) -> None:
            replies_ = data.draw(self._replies(), label="replies")
            permutation = data.draw(st.permutations(range(len(replies_))), label="relabelling")
            nodes = [node for node, _, _ in replies_]
            relabelled = sorted(
                ((nodes[permutation[i]], t, w) for i, (_, t, w) in enumerate(replies_)),
                key=lambda reply: reply[0],
            )
            with self._scratch() as tmp:
                root = Path(tmp)
                items = self._write(root / "replies", replies_)
                others = self._write(root / "relabelled", relabelled)
                sha = self._aggregate(self.make_strategy(), items, root / "a.safetensors")
                other = self._aggregate(self.make_strategy(), others, root / "b.safetensors")
                moved = {n: nodes[permutation[i]] for i, n in enumerate(nodes)}
                assert sha == other, (
                    "the aggregate depends on which node sent which reply (set node_symmetric "
                    "= False if the strategy keeps per-node memory): the replies of "
                    f"{nodes} give {_short(sha)}, the same replies sent by "
                    f"{[moved[n] for n in nodes]} give {_short(other)}"
                )

        self._run(check, st.data())

    def test_same_inputs_give_the_same_bytes(self) -> None:
        """Deterministic: one instance, the same replies twice, the same file."""

        def check(replies_: list[Any]) -> None:
            with self._scratch() as tmp:
                root = Path(tmp)
                items = self._write(root / "replies", replies_)
                strategy = self.make_strategy()
                first = self._aggregate(strategy, items, root / "a.safetensors")
                second = self._aggregate(strategy, items, root / "b.safetensors")
                assert first == second, (
                    f"the same replies {self._describe(items)} aggregated twice give "
                    f"{_short(first)} then {_short(second)}"
                )
                assert (root / "a.safetensors").read_bytes() == (
                    root / "b.safetensors"
                ).read_bytes()

        self._run(check, self._replies())

    def test_restored_instance_gives_the_same_result(self) -> None:
        """A live instance that already aggregated a round agrees with a new instance built
        from make_strategy() and its recorded state (what Job.restore does)."""

        def check(earlier: list[Any], replies_: list[Any]) -> None:
            with self._scratch() as tmp:
                root = Path(tmp)
                live = self.make_strategy()
                self._aggregate(live, self._write(root / "r1", earlier), root / "r1.safetensors")
                state = live.state()
                assert _json_like(state), f"state() is not plain JSON-like data: {state!r}"
                json.dumps(state)
                items = self._write(root / "r2", replies_)
                live_sha = self._aggregate(live, items, root / "live.safetensors")
                restored = self.make_strategy()
                restored.load_state(state)
                restored_sha = self._aggregate(restored, items, root / "restored.safetensors")
                assert live_sha == restored_sha, (
                    "a restored job's strategy (make_strategy() + load_state(state())) gives "
                    f"{_short(restored_sha)} where the live one gives {_short(live_sha)}, for "
                    f"the replies {self._describe(items)} after an earlier round"
                )

        self._run(check, self._replies(), self._replies())

    def test_audit_recomputes_the_recorded_digest(self) -> None:
        """The replies stored in a repository, fetched back by digest (other paths, as
        ``fedsm replay --verify --repo`` does), aggregate to the recorded digest."""

        def check(replies_: list[Any]) -> None:
            from fedsm.repository import LocalRepository
            from fedsm.strategies.fedavg import FedAvg

            with self._scratch() as tmp:
                root = Path(tmp)
                items = self._write(root / "replies", replies_)
                strategy = self.make_strategy()
                recorded = self._aggregate(strategy, items, root / "aggregate.safetensors")
                repo = LocalRepository(root / "repository")
                digests = {node: repo.upload_file(path)["sha256"] for node, path, _ in items}
                shutil.rmtree(root / "replies")  # only the repository is left
                scratch = root / "audit"
                scratch.mkdir()
                fetched = []
                for node, _, weight in items:
                    dest = scratch / digests[node]
                    repo.download_file(repo.url_for(digests[node]), dest)
                    fetched.append((node, dest, weight))
                again = self._aggregate(self.make_strategy(), fetched, root / "again.safetensors")
                assert again == recorded, (
                    f"recomputed from the stored reply files, the aggregate is {_short(again)}, "
                    f"not the recorded {_short(recorded)}: the strategy depends on more than "
                    "the replies' bytes and weights (their paths?)"
                )
                if getattr(strategy, "name", None) == "fedavg":
                    audit = self._aggregate(FedAvg(), fetched, root / "audit.safetensors")
                    assert audit == recorded, (
                        f"{type(strategy).__name__} is named 'fedavg', so the audit recomputes "
                        f"its rounds with FedAvg, which gives {_short(audit)}, not the "
                        f"recorded {_short(recorded)}"
                    )

        self._run(check, self._replies())

    def test_aggregator_args_are_a_function_of_their_inputs(self) -> None:
        """create_aggregator_args: same arguments, same result; JSON-like message values;
        files with the same bytes."""

        def check(round_number: int, nodes: list[str], params: dict[str, Any]) -> None:
            from fedsm.digests import sha256_file
            from fedsm.training.params import save_params

            with self._scratch() as tmp:
                root = Path(tmp)
                global_path = root / "global.safetensors"
                save_params(global_path, params)
                results = []
                for attempt in ("first", "second"):
                    small, files = self.make_strategy().create_aggregator_args(
                        round_number=round_number,
                        node_ids=list(nodes),
                        global_params_path=global_path,
                        out_dir=root / attempt,
                    )
                    assert _json_like(small), (
                        f"create_aggregator_args' message values must be JSON-like: {small!r}"
                    )
                    assert set(small) <= set(nodes) and set(files) <= set(nodes), (
                        f"aggregator args for nodes not in the round {nodes}: "
                        f"{sorted(set(small) | set(files))}"
                    )
                    digests = {
                        node: {name: sha256_file(Path(path)) for name, path in heavy.items()}
                        for node, heavy in files.items()
                    }
                    results.append((json.loads(json.dumps(small, sort_keys=True)), digests))
                assert results[0] == results[1], (
                    f"create_aggregator_args(round_number={round_number}, node_ids={nodes}) "
                    f"gave {results[0]!r} then {results[1]!r}"
                )

        self._run(
            check,
            st.integers(1, 20),
            st.lists(st.sampled_from(NODE_NAMES), min_size=1, max_size=4, unique=True).map(sorted),
            _tensors(self.model_shapes),
        )
