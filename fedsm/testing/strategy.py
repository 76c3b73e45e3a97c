"""The contract every aggregation strategy of fedsm keeps, as property-based tests.

A strategy (a :class:`~fedsm.strategies.base.Strategy`: ``name``, ``config``,
``node_args``, ``aggregate``) is run by a Job, by a restored Job and by the audit
(``fedsm replay --verify --repo``), all three through
:func:`fedsm.strategies.base.aggregate_files`, and all three must get the same bytes. A
restored Job and the audit rebuild the strategy from its recorded configuration and hand it
its state read back from a file fetched by digest. So a strategy must be:

- **order independent**: a round's replies given in any order (as they arrive) give the same
  parameters and state (sha256); the caller sorts them by node id, and nothing of the order
  they came in may reach the strategy. Relabelling the nodes (the same tensors, weights and
  extras, but which node sent which permuted) changes nothing either, unless the strategy
  declares ``node_symmetric = False`` (per-node memory, as Scaffold's control variates);
- **deterministic**: the same inputs twice give the same files;
- **restorable**: ``config()`` is JSON-like and ``from_config(config())`` is an equal
  strategy; the live instance, which aggregated an earlier round in memory and keeps that
  round's state object, agrees bit for bit with the rebuilt one given the state saved to a
  file and loaded back (:func:`~fedsm.training.params.save_params` /
  :func:`~fedsm.training.params.load_params`): nothing may live outside the state;
- **recomputable**: the global parameters, reply files and state stored in a repository and
  fetched back by digest (other paths) aggregate to the recorded digests (a strategy named
  ``fedavg`` must moreover agree with :class:`~fedsm.strategies.fedavg.FedAvg`);
- **pure in its node arguments**: ``node_args`` on the same context twice gives the same
  result, only for the round's nodes, each value JSON-like (it goes in the message) or a
  mapping of tensors (it goes as a file, compared by its bytes).

Usage::

    class TestMyStrategy(StrategyContract):
        __test__ = True

        def make_strategy(self):
            return MyStrategy(alpha=0.5)

Replies carry the extras the strategy's ``required_extras`` names (``num_updates`` as a
small integer, ``lr`` as a power of two, anything else a small positive dyadic number;
override :meth:`StrategyContract.extras_for` for others). Tensors are drawn as small dyadic
numbers (multiples of 1/8) and weights as integers, so that every weighted sum is exact in
float64: a difference found is a real dependence on order or labels, not rounding.
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

#: Every node of the job (the ``all_nodes`` of each round).
NODE_NAMES = ("node-a", "node-b", "node-c", "node-d", "node-e", "node-f")

#: ``(node_id, tensors, weight, extras)``
Reply = tuple[str, dict[str, Any], float, dict[str, float]]


def _tensors(shapes: Mapping[str, tuple[int, ...]]) -> st.SearchStrategy[dict[str, Any]]:
    """Float32 tensors of ``shapes`` whose values are multiples of 1/8 in [-128, 128]."""
    import torch

    def tensor(shape: tuple[int, ...]) -> st.SearchStrategy[Any]:
        size = math.prod(shape)
        return st.lists(st.integers(-1024, 1024), min_size=size, max_size=size).map(
            lambda values: torch.tensor([v / 8 for v in values], dtype=torch.float32).reshape(shape)
        )

    return st.fixed_dictionaries({name: tensor(shape) for name, shape in sorted(shapes.items())})


def _extras(keys: Sequence[str]) -> st.SearchStrategy[dict[str, float]]:
    def value(key: str) -> st.SearchStrategy[float]:
        if key == "num_updates":
            return st.integers(1, 16).map(float)
        if key == "lr":
            return st.sampled_from([0.0625, 0.125, 0.25, 0.5, 1.0])
        return st.integers(1, 64).map(lambda v: v / 8)

    return st.fixed_dictionaries({key: value(key) for key in sorted(keys)})


def replies(
    shapes: Mapping[str, tuple[int, ...]] = DEFAULT_SHAPES,
    *,
    min_nodes: int = 1,
    max_nodes: int = 4,
    extras: st.SearchStrategy[dict[str, float]] | None = None,
) -> st.SearchStrategy[list[Reply]]:
    """One round's replies: ``[(node_id, tensors, weight, extras)]`` in sorted node order,
    distinct nodes of :data:`NODE_NAMES`, positive integer weights (sample counts)."""
    return st.lists(
        st.tuples(
            st.sampled_from(NODE_NAMES),
            _tensors(shapes),
            st.integers(1, 1000).map(float),
            extras if extras is not None else st.just({}),
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


def _tensor_dict(value: Any) -> bool:
    import torch

    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _short(sha: str | None) -> str:
    return "no state" if sha is None else sha[:12]


class StrategyContract:
    """Property tests every aggregation strategy passes; subclass, set ``__test__ = True``
    and implement :meth:`make_strategy`."""

    __test__ = False

    #: The model's parameters: name -> shape (float32).
    model_shapes: Mapping[str, tuple[int, ...]] = DEFAULT_SHAPES
    #: Largest number of replies in a round.
    max_nodes: int = 4
    #: Bound on examples per property, for everyday runs (see the module's docstring).
    max_examples: int = 25
    #: Profiles whose settings are used unbounded.
    unbounded_profiles: tuple[str, ...] = ("deep",)

    def make_strategy(self) -> Any:
        """A new strategy, configured as the job under test would build it."""
        raise NotImplementedError("a StrategyContract subclass implements make_strategy()")

    def extras_for(self, strategy: Any) -> st.SearchStrategy[dict[str, float]]:
        """The extras of a reply: one value per key of ``strategy.required_extras``."""
        return _extras(tuple(getattr(strategy, "required_extras", ())))

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

    def _replies(self) -> st.SearchStrategy[list[Reply]]:
        return replies(
            self.model_shapes,
            max_nodes=self.max_nodes,
            extras=self.extras_for(self.make_strategy()),
        )

    def _global(self) -> st.SearchStrategy[dict[str, Any]]:
        return _tensors(self.model_shapes)

    @staticmethod
    def _write(directory: Path, replies_: Sequence[Reply]) -> list[tuple[str, Path, float, Any]]:
        from fedsm.training.params import save_params

        directory.mkdir(parents=True, exist_ok=True)
        items = []
        for node, tensors, weight, extras in replies_:
            path = directory / f"{node}.safetensors"
            save_params(path, tensors)
            items.append((node, path, weight, dict(extras)))
        return items

    @staticmethod
    def _rebuild(strategy: Any) -> Any:
        """What a restore or an audit builds from the log: the configuration through JSON,
        by registry name when the strategy is registered."""
        from fedsm.strategies.base import resolve, strategy_name

        config = strategy.config()
        assert _json_like(config), f"config() is not plain JSON-like data: {config!r}"
        recorded = json.loads(json.dumps(config, sort_keys=True))
        name = strategy_name(strategy)
        rebuilt = (
            resolve(name, recorded) if ":" not in name else type(strategy).from_config(recorded)
        )
        assert type(rebuilt) is type(strategy) and rebuilt.config() == config, (
            f"{type(strategy).__name__}.from_config(config()) is {rebuilt!r}, not an equal "
            f"strategy (config() = {config!r})"
        )
        return rebuilt

    @staticmethod
    def _round(
        strategy: Any,
        root: Path,
        tag: str,
        *,
        global_path: Path,
        items: Sequence[tuple[str, Path, float, Any]],
        state_path: Path | None,
        round_number: int = 1,
    ) -> tuple[str, str | None]:
        """One round through :func:`fedsm.strategies.base.aggregate_files`; the digests of the
        parameters and the state written (checked against the files' bytes)."""
        from fedsm.digests import sha256_file
        from fedsm.strategies.base import aggregate_files

        out, state_out = root / f"{tag}.params", root / f"{tag}.state"
        digest, state_digest = aggregate_files(
            strategy,
            round=round_number,
            global_params_path=global_path,
            replies=list(items),
            all_nodes=NODE_NAMES,
            state_path=state_path,
            out_path=out,
            state_out_path=state_out,
        )
        assert digest == sha256_file(out), (
            f"aggregate_files returned sha256 {_short(digest)} but wrote a file hashing to "
            f"{_short(sha256_file(out))}"
        )
        if state_digest is not None:
            assert state_digest == sha256_file(state_out)
        return digest, state_digest

    @staticmethod
    def _context(
        global_params: Mapping[str, Any], replies_: Sequence[Reply], state: Any, round_number: int
    ) -> Any:
        from fedsm.strategies.base import AggregateContext, NodeUpdate

        return AggregateContext(
            round=round_number,
            global_params=dict(global_params),
            updates=tuple(NodeUpdate.of(n, t, w, e) for n, t, w, e in replies_),
            all_nodes=NODE_NAMES,
            state=state,
        )

    @staticmethod
    def _check_state(strategy: Any, state: Any) -> None:
        import torch

        ok = state is None or (
            isinstance(state, Mapping)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
        )
        assert ok, (
            f"{type(strategy).__name__}.aggregate returned a state that is not None or a "
            f"mapping of name -> tensor (it is saved as a params file): {state!r}"
        )

    @staticmethod
    def _scratch() -> tempfile.TemporaryDirectory[str]:
        return tempfile.TemporaryDirectory(prefix="fedsm-strategy-contract-")

    @staticmethod
    def _describe(items: Sequence[tuple[str, Path, float, Any]]) -> str:
        return "[" + ", ".join(f"({n}, w={w:g}, {dict(e)})" for n, _, w, e in items) + "]"

    def _save_global(self, root: Path, tensors: Mapping[str, Any]) -> Path:
        from fedsm.training.params import save_params

        path = root / "global.params"
        save_params(path, tensors)
        return path

    # ------------------------------------------------------------------ the properties

    def test_order_of_replies_does_not_matter(self) -> None:
        """A round's replies in any order (as they arrive), after an earlier round whose
        state the strategy is given, give the same parameters and state."""

        def check(data: st.DataObject) -> None:
            global_params = data.draw(self._global(), label="global")
            earlier = data.draw(self._replies(), label="earlier")
            replies_ = data.draw(self._replies(), label="replies")
            permutation = data.draw(st.permutations(range(len(replies_))), label="order")
            with self._scratch() as tmp:
                root = Path(tmp)
                global_path = self._save_global(root, global_params)
                first = self._round(
                    self.make_strategy(),
                    root,
                    "r1",
                    global_path=global_path,
                    items=self._write(root / "r1", earlier),
                    state_path=None,
                )
                state_path = root / "r1.state" if first[1] is not None else None
                items = self._write(root / "r2", replies_)
                shuffled = [items[i] for i in permutation]
                kw = {"global_path": global_path, "state_path": state_path, "round_number": 2}
                in_order = self._round(self.make_strategy(), root, "a", items=items, **kw)
                arrived = self._round(self.make_strategy(), root, "b", items=shuffled, **kw)
                assert in_order == arrived, (
                    "the aggregate depends on the order of the replies (fedsm aggregates in "
                    "sorted node order; the audit and a restored job must get the same bytes): "
                    f"replies {self._describe(items)} give {_short(in_order[0])} (state "
                    f"{_short(in_order[1])}), in the order {self._describe(shuffled)} they "
                    f"give {_short(arrived[0])} (state {_short(arrived[1])})"
                )

        self._run(check, st.data())

    def test_which_node_sent_which_reply_does_not_matter(self) -> None:
        """The same tensors, weights and extras under permuted node ids give the same
        aggregate (skipped for a strategy with ``node_symmetric = False``)."""
        if not getattr(self.make_strategy(), "node_symmetric", True):
            return

        def check(data: st.DataObject) -> None:
            global_params = data.draw(self._global(), label="global")
            replies_ = data.draw(self._replies(), label="replies")
            permutation = data.draw(st.permutations(range(len(replies_))), label="relabelling")
            nodes = [reply[0] for reply in replies_]
            relabelled = sorted(
                ((nodes[permutation[i]], t, w, e) for i, (_, t, w, e) in enumerate(replies_)),
                key=lambda reply: reply[0],
            )
            with self._scratch() as tmp:
                root = Path(tmp)
                kw = {"global_path": self._save_global(root, global_params), "state_path": None}
                items = self._write(root / "replies", replies_)
                others = self._write(root / "relabelled", relabelled)
                sha = self._round(self.make_strategy(), root, "a", items=items, **kw)
                other = self._round(self.make_strategy(), root, "b", items=others, **kw)
                moved = {n: nodes[permutation[i]] for i, n in enumerate(nodes)}
                assert sha == other, (
                    "the aggregate depends on which node sent which reply (set node_symmetric "
                    "= False if the strategy keeps per-node memory): the replies of "
                    f"{nodes} give {_short(sha[0])}, the same replies sent by "
                    f"{[moved[n] for n in nodes]} give {_short(other[0])}"
                )

        self._run(check, st.data())

    def test_same_inputs_give_the_same_bytes(self) -> None:
        """Deterministic: one instance, the same round twice, the same files."""

        def check(global_params: dict[str, Any], replies_: list[Reply]) -> None:
            with self._scratch() as tmp:
                root = Path(tmp)
                kw = {"global_path": self._save_global(root, global_params), "state_path": None}
                items = self._write(root / "replies", replies_)
                strategy = self.make_strategy()
                first = self._round(strategy, root, "a", items=items, **kw)
                second = self._round(strategy, root, "b", items=items, **kw)
                assert first == second, (
                    f"the same replies {self._describe(items)} aggregated twice by one "
                    f"instance give {_short(first[0])} (state {_short(first[1])}) then "
                    f"{_short(second[0])} (state {_short(second[1])})"
                )

        self._run(check, self._global(), self._replies())

    def test_restored_instance_gives_the_same_result(self) -> None:
        """A live instance that aggregated a round in memory agrees with one rebuilt from
        its recorded configuration and given the state read back from a file (what
        Job.restore and the audit do)."""

        def check(global_params: dict[str, Any], earlier: list[Reply], now: list[Reply]) -> None:
            from fedsm.training.params import load_params, save_params

            live = self.make_strategy()
            first = live.aggregate(self._context(global_params, earlier, None, 1))
            self._check_state(live, first.state)
            second_global = first.params
            live_second = live.aggregate(self._context(second_global, now, first.state, 2))
            self._check_state(live, live_second.state)
            with self._scratch() as tmp:
                root = Path(tmp)
                state_path = None
                if first.state is not None:
                    state_path = root / "r1.state"
                    save_params(state_path, first.state)
                restored = self._rebuild(live)
                state = load_params(state_path) if state_path is not None else None
                again = restored.aggregate(self._context(second_global, now, state, 2))
                live_sha = save_params(root / "live.params", live_second.params)
                again_sha = save_params(root / "again.params", again.params)
                live_state = again_state = None
                if live_second.state is not None:
                    live_state = save_params(root / "live.state", live_second.state)
                if again.state is not None:
                    again_state = save_params(root / "again.state", again.state)
                assert (live_sha, live_state) == (again_sha, again_state), (
                    f"a restored job's strategy ({type(live).__name__}.from_config(config()) "
                    "given the state saved to a file and read back) gives "
                    f"{_short(again_sha)} (state {_short(again_state)}) where the live one "
                    f"gives {_short(live_sha)} (state {_short(live_state)}), for the replies "
                    f"{[(n, w, e) for n, _, w, e in now]} after an earlier round: does the "
                    "strategy remember something outside its state, or lose it in the file?"
                )

        self._run(check, self._global(), self._replies(), self._replies())

    def test_audit_recomputes_the_recorded_digest(self) -> None:
        """The global parameters, replies and state stored in a repository and fetched back
        by digest (other paths, as ``fedsm replay --verify --repo`` does) aggregate, by a
        rebuilt strategy, to the recorded digests."""

        def check(global_params: dict[str, Any], earlier: list[Reply], now: list[Reply]) -> None:
            from fedsm.repository import LocalRepository
            from fedsm.strategies.fedavg import FedAvg

            with self._scratch() as tmp:
                root = Path(tmp)
                job = root / "job"
                job.mkdir()
                strategy = self.make_strategy()
                global_path = self._save_global(job, global_params)
                first = self._round(
                    strategy,
                    job,
                    "r1",
                    global_path=global_path,
                    items=self._write(job / "r1", earlier),
                    state_path=None,
                )
                state_path = job / "r1.state" if first[1] is not None else None
                items = self._write(job / "r2", now)
                recorded = self._round(
                    strategy,
                    job,
                    "r2",
                    global_path=job / "r1.params",
                    items=items,
                    state_path=state_path,
                    round_number=2,
                )
                repo = LocalRepository(root / "repository")

                def store(path: Path) -> str:
                    return repo.upload_file(path)["sha256"]

                stored_global = store(job / "r1.params")
                stored_state = store(state_path) if state_path is not None else None
                stored = [(n, store(p), w, e) for n, p, w, e in items]
                shutil.rmtree(job)  # only the repository is left
                audit = root / "audit"
                audit.mkdir()

                def fetch(digest: str) -> Path:
                    dest = audit / digest
                    if not dest.exists():
                        repo.download_file(repo.url_for(digest), dest)
                    return dest

                fetched = [(n, fetch(d), w, e) for n, d, w, e in stored]
                kw = {
                    "global_path": fetch(stored_global),
                    "state_path": fetch(stored_state) if stored_state is not None else None,
                    "round_number": 2,
                }
                again = self._round(self._rebuild(strategy), audit, "again", items=fetched, **kw)
                assert again == recorded, (
                    f"recomputed from the stored files, round 2 gives {_short(again[0])} "
                    f"(state {_short(again[1])}), not the recorded {_short(recorded[0])} "
                    f"(state {_short(recorded[1])}): the strategy depends on more than its "
                    "configuration, its state and the replies' bytes, weights and extras"
                )
                if getattr(strategy, "name", None) == "fedavg":
                    audited = self._round(FedAvg(), audit, "fedavg", items=fetched, **kw)
                    assert audited[0] == recorded[0], (
                        f"{type(strategy).__name__} is named 'fedavg', so the audit recomputes "
                        f"its rounds with FedAvg, which gives {_short(audited[0])}, not the "
                        f"recorded {_short(recorded[0])}"
                    )

        self._run(check, self._global(), self._replies(), self._replies())

    def test_node_args_are_a_function_of_their_inputs(self) -> None:
        """node_args: the same context twice (a rebuilt instance the second time) gives the
        same result, for the round's nodes only; message values JSON-like, tensor mappings
        (files) the same bytes."""

        def check(
            round_number: int,
            nodes: list[str],
            global_params: dict[str, Any],
            earlier: list[Reply] | None,
        ) -> None:
            from fedsm.strategies.base import NodeArgsContext
            from fedsm.training.params import save_params

            strategy = self.make_strategy()
            state = None
            if earlier is not None:
                state = strategy.aggregate(self._context(global_params, earlier, None, 1)).state
            ctx = NodeArgsContext(
                round=round_number,
                node_ids=tuple(nodes),
                all_nodes=NODE_NAMES,
                global_params=dict(global_params),
                state=state,
            )
            results = []
            with self._scratch() as tmp:
                root = Path(tmp)
                for attempt, instance in (("first", strategy), ("second", self._rebuild(strategy))):
                    args = instance.node_args(ctx)
                    assert isinstance(args, Mapping) and set(args) <= set(nodes), (
                        f"node_args must map nodes of the round {nodes} to their arguments, got "
                        f"{args!r}"
                    )
                    seen: dict[str, dict[str, Any]] = {}
                    for node, values in sorted(args.items()):
                        assert isinstance(values, Mapping), (
                            f"node_args()[{node!r}] must be a mapping of argument -> value, got "
                            f"{values!r}"
                        )
                        seen[node] = {}
                        for arg, value in sorted(values.items()):
                            if _tensor_dict(value):
                                path = root / f"{attempt}-{node}-{arg}.params"
                                seen[node][arg] = ("file", save_params(path, value))
                            else:
                                assert _json_like(value), (
                                    f"node_args()[{node!r}][{arg!r}] is neither JSON-like (it "
                                    f"goes in the message) nor a mapping of tensors (it goes as "
                                    f"a file): {value!r}"
                                )
                                seen[node][arg] = json.loads(json.dumps(value, sort_keys=True))
                    results.append(seen)
            assert results[0] == results[1], (
                f"node_args(round={round_number}, node_ids={nodes}) gave {results[0]!r} then "
                f"{results[1]!r}"
            )

        self._run(
            check,
            st.integers(1, 20),
            st.lists(st.sampled_from(NODE_NAMES), min_size=1, max_size=4, unique=True).map(sorted),
            self._global(),
            st.none() | self._replies(),
        )
